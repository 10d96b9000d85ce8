"""Stage 2, lora: compile the toggles into one plan, then apply it with peft (or train fully).

The four Unsloth-style toggles (vision / language x attention / MLP) become one regex anchored
on the family's tower prefixes; peft full-matches it against module names. The plan lists every
targeted module before anything is changed, so what will train is visible and testable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import RecipeError
from vlmtune.families import COMPONENTS, Family
from vlmtune.recipe import LoraSection
from vlmtune.stages.load import is_linear


@dataclass(frozen=True)
class LoraPlan:
    method: str
    regex: str | None  # None for full fine-tuning
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    targets_per_component: dict[str, int] = field(default_factory=dict)


def target_regex(family: Family, lora: LoraSection) -> str:
    """Anchored regex of the Linears the toggles select."""
    if lora.target_modules:
        return lora.target_modules
    towers = []
    if lora.finetune_vision_layers:
        names = _names(family.vision_attention, family.vision_mlp, lora)
        # The projector often lives inside the vision tower (Qwen's model.visual.merger): exclude it.
        exclude = "".join(f"(?!{re.escape(p)}(?:\\.|$))" for p in family.projector_prefixes)
        towers.append(f"{exclude}{re.escape(family.vision_prefix)}\\.(?:.*\\.)?(?:{names})")
    if lora.finetune_language_layers:
        names = _names(family.language_attention, family.language_mlp, lora)
        towers.append(f"{re.escape(family.language_prefix)}\\.(?:.*\\.)?(?:{names})")
    return "^(?:" + "|".join(towers) + ")$"


def _names(attention: tuple[str, ...], mlp: tuple[str, ...], lora: LoraSection) -> str:
    chosen = [
        *(attention if lora.finetune_attention_modules else ()),
        *(mlp if lora.finetune_mlp_modules else ()),
    ]
    return "|".join(re.escape(n) for n in chosen)


def plan(model: Any, family: Family, lora: LoraSection) -> LoraPlan:
    """Which modules will train, decided from the model's real module names."""
    if lora.method == "full":
        return LoraPlan("full", None, (), ())
    regex = target_regex(family, lora)
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise RecipeError(
            f"lora.target_modules is not a valid regex: {exc}", hint="test it with python's re"
        ) from None
    targets = tuple(n for n, m in model.named_modules() if is_linear(m) and pattern.fullmatch(n))
    if not targets:
        raise RecipeError(
            f"the LoRA targets match no Linear layer of this {family.title} model (regex {regex})",
            hint="check lora.target_modules against the names `vlmtune inspect` prints",
        )
    per_component = {c: 0 for c in COMPONENTS}
    for name in targets:
        per_component[family.component_of(name)] += 1
    modules_to_save = _present_projectors(model, family) if lora.train_projector else ()
    return LoraPlan("lora", regex, targets, modules_to_save, per_component)


def _present_projectors(model: Any, family: Family) -> tuple[str, ...]:
    names = {n for n, _ in model.named_modules()}
    return tuple(p for p in family.projector_prefixes if p in names)


def apply(model: Any, lora: LoraSection, lora_plan: LoraPlan, *, seed: int) -> Any:
    """The model with adapters attached (or every weight trainable for method: full).

    ``seed`` fixes the random lora_A initialisation: without it two runs of one recipe start
    from the same loss but part ways from the second step on.
    """
    if lora_plan.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import torch
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        target_modules=lora_plan.regex,
        modules_to_save=list(lora_plan.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def trainable_report(model: Any, family: Family, lora_plan: LoraPlan) -> dict:
    """The lora_plan.json content: every targeted module and trainable params per component."""
    trainable = {c: 0 for c in COMPONENTS}
    total = {c: 0 for c in COMPONENTS}
    for name, param in model.named_parameters():
        component = family.component_of(_base_name(name))
        total[component] += param.numel()
        if param.requires_grad:
            trainable[component] += param.numel()
    return {
        "method": lora_plan.method,
        "regex": lora_plan.regex,
        "targets": list(lora_plan.targets),
        "targets_per_component": lora_plan.targets_per_component,
        "modules_to_save": list(lora_plan.modules_to_save),
        "trainable_params": trainable,
        "trainable_total": sum(trainable.values()),
        "params_total": sum(total.values()),
    }


def _base_name(param_name: str) -> str:
    """peft's name of a parameter -> the base model's module name it belongs to."""
    name = param_name.removeprefix("base_model.model.")
    for marker in (".lora_A.", ".lora_B.", ".base_layer.", ".modules_to_save.default.", ".original_module."):
        name = name.replace(marker, ".")
    return name.rsplit(".", 1)[0]
