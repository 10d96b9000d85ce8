"""Per-component learning rates (train.lr_vision, lr_projector, lr_language) and LoRA+ (train.loraplus_lr_ratio)
as the optimizer's parameter groups.

Every trainable parameter falls in the group of its component, by the family record's prefixes (vision,
projector, language, lm_head, other); lm_head learns at lr_language, other at train.lr. With LoRA+ each
component's B matrices and DoRA magnitude vectors form a group of their own at ratio x that rate (peft's
LoRA+ helper speeds up every 1-D parameter too; here a trained bias keeps its component's rate). Each
group is split again by weight decay as the Trainer splits its own (no decay on biases and norms).

The groups are a pure function of the parameter names, so a resumed run builds the very groups its
checkpoint's optimizer state was saved with. The scheduler scales each group's own peak rate, and the
trainer logs each group's current rate as learning_rate_<group> (ReliableTrainerMixin).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vlmtune.errors import RecipeError
from vlmtune.model.families import COMPONENTS, Family
from vlmtune.model.modelinfo import base_module_name

# train.lr_* of each component (lm_head is the language model's output; other keeps train.lr)
RATE_KEY = {
    "vision": "lr_vision",
    "projector": "lr_projector",
    "language": "lr_language",
    "lm_head": "lr_language",
}
# What a rate's component is called, and the lora switch that trains it
PART_AND_SWITCH = {
    "vision": ("vision tower", "lora.finetune_vision_layers: true"),
    "projector": ("projector", "lora.train_projector: true"),
    "language": ("language model", "lora.finetune_language_layers: true"),
}
# Names wrappers put into parameter names (FSDP, activation checkpointing, torch.compile): not the model's
WRAPPERS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")
FAST = (".lora_B.", ".lora_magnitude_vector.")  # what LoRA+ speeds up
FAST_SUFFIX = "_lora_b"


@dataclass(frozen=True)
class Group:
    name: str  # vision, vision_lora_b, projector, language, language_lora_b, lm_head, other
    lr: float
    params: tuple[str, ...]  # names of the trainable parameters it holds, in the model's order


@dataclass(frozen=True)
class GroupRates:
    """What the train section asks of the optimizer: a peak rate per component, and LoRA+'s ratio."""

    lr: float
    rates: dict[str, float]  # component -> peak learning rate, for the components the recipe sets
    loraplus_ratio: float | None
    family: Family

    @classmethod
    def from_train(cls, train: Any, family: Family) -> GroupRates | None:
        """None when the recipe sets no lr_* and no LoRA+ ratio: the Trainer's own optimizer, untouched."""
        rates = {c: getattr(train, key) for c, key in RATE_KEY.items() if getattr(train, key) is not None}
        if not rates and train.loraplus_lr_ratio is None:
            return None
        return cls(train.lr, rates, train.loraplus_lr_ratio, family)

    def groups(self, named_trainable: Iterable[str]) -> list[Group]:
        """The groups over the trainable parameter names, in the order of COMPONENTS; a RecipeError for a
        component rate the recipe sets over a component where nothing trains."""
        members: dict[str, list[str]] = {}
        for name in named_trainable:
            members.setdefault(self.group_of(name), []).append(name)
        self._check_every_rate_applies(members)
        order = [g for c in COMPONENTS for g in (c, c + FAST_SUFFIX)]
        return [Group(g, self.rate_of(g), tuple(members[g])) for g in order if g in members]

    def group_of(self, name: str) -> str:
        plain = name
        for wrapper in WRAPPERS:
            plain = plain.replace(wrapper, "")
        component = self.family.component_of(base_module_name(plain))
        fast = self.loraplus_ratio is not None and any(part in plain for part in FAST)
        return component + (FAST_SUFFIX if fast else "")

    def rate_of(self, group: str) -> float:
        rate = self.rates.get(group.removesuffix(FAST_SUFFIX), self.lr)  # rates holds lm_head as lr_language
        return rate * (self.loraplus_ratio if group.endswith(FAST_SUFFIX) else 1.0)

    def _check_every_rate_applies(self, members: dict[str, list[str]]) -> None:
        for component in self.rates.keys() - {"lm_head"}:  # lm_head's rate is lr_language's
            if not any(g.removesuffix(FAST_SUFFIX) == component for g in members):
                part, switch = PART_AND_SWITCH[component]
                raise RecipeError(
                    f"train.{RATE_KEY[component]} is set but nothing in the {part} trains under this lora section",
                    hint=f"drop train.{RATE_KEY[component]}, or train the {part} ({switch})",
                )

    # --- the optimizer ------------------------------------------------------------------------

    def optimizer(self, trainer: Any, model: Any) -> Any:
        """The Trainer's optimizer class (train.optim) over these groups, each split by weight decay."""
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        decay = set(trainer.get_decay_parameter_names(model))
        param_groups = []
        for group in self.groups(trainable):
            for decays in (True, False):
                params = [trainable[n] for n in group.params if (n in decay) == decays]
                if params:
                    weight_decay = trainer.args.weight_decay if decays else 0.0
                    param_groups.append(
                        {"params": params, "lr": group.lr, "weight_decay": weight_decay, "name": group.name}
                    )
        optimizer_cls, kwargs = trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
        return optimizer_cls(param_groups, **kwargs)

    def logged(self, optimizer: Any) -> dict[str, float]:
        """learning_rate_<group>: each group's current rate (the decay and no-decay halves share it), and
        learning_rate as train.lr's own schedule (the Trainer would log the first group's rate under it)."""
        groups = [g for g in optimizer.param_groups if "name" in g]
        rates = {f"learning_rate_{g['name']}": g["lr"] for g in groups}
        first = groups[0] if groups else None
        if first is not None and first.get("initial_lr"):  # the scheduler's record of the group's peak
            rates["learning_rate"] = self.lr * first["lr"] / first["initial_lr"]
        return rates


def plan_report(rates: GroupRates | None, model: Any) -> list[dict] | None:
    """The groups as 2-lora/lora_plan.json lists them: name, peak rate, parameter count and tensors."""
    if rates is None:
        return None
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    return [
        {"name": g.name, "lr": g.lr, "params": sum(trainable[n] for n in g.params), "tensors": len(g.params)}
        for g in rates.groups(trainable)
    ]
