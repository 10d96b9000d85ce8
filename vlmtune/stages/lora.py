"""Stage 2, lora: compile the toggles into one plan, then apply it with peft (or train fully).

The four Unsloth-style toggles (vision / language x attention / MLP) become one regex anchored
on the family's tower prefixes (vlmtune.model.lora_targets); peft full-matches it against module
names. The plan lists every targeted module before anything is changed, so what will train is
visible and testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.model import modelinfo
from vlmtune.model.families import COMPONENTS, Family
from vlmtune.model.lora_targets import (
    expert_refusal,
    present_projectors,
    select_expert_parameters,
    select_targets,
    target_regex,
)
from vlmtune.recipe import LoraSection, TrainSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.training.param_groups import GroupRates, plan_report

DORA_MAGNITUDE = ".lora_magnitude_vector."  # peft's name segment of DoRA's trained magnitudes


# lora.init -> peft's init_lora_weights. loftq starts as peft's default, then vlmtune.model.loftq sets the
# adapters of the 4-bit Linears (peft's own loftq start needs a 16-bit base it then replaces). peft's
# randomized pissa_niter_N is left out on purpose: peft repeats the start when it loads a pissa adapter,
# and a randomized SVD would rebuild a different base than the one the adapter was trained on.
PEFT_INIT: dict[str, bool | str] = {
    "kaiming": True, "gaussian": "gaussian", "pissa": "pissa", "olora": "olora", "loftq": True,
}  # fmt: skip


@dataclass(frozen=True)
class LoraPlan:
    method: str  # lora | dora | full
    regex: str | None  # None for full fine-tuning
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    targets_per_component: dict[str, int] = field(default_factory=dict)
    # Fused expert tensors (3-D parameters, no Linears) LoRA reaches through peft's target_parameters.
    expert_parameters: tuple[str, ...] = ()
    experts_refused: str | None = None  # why the MLP toggle leaves the experts untrained (the family's word)
    init: str = "kaiming"  # lora.init: how the adapters start


def plan(model: Any, family: Family, lora: LoraSection) -> LoraPlan:
    """Which modules will train, decided from the model's real module names."""
    if lora.method == "full":
        return LoraPlan("full", None, (), ())
    modules = dict(model.named_modules())
    experts = select_expert_parameters(family, lora, (n for n, _ in model.named_parameters()))
    targets = select_targets(family, lora, (n for n, m in modules.items() if modelinfo.is_linear(m)), experts)
    per_component = dict.fromkeys(COMPONENTS, 0)
    for name in targets:
        per_component[family.component_of(name)] += 1
    modules_to_save = present_projectors(family, modules) if lora.train_projector else ()
    return LoraPlan(
        lora.method, target_regex(family, lora), targets, modules_to_save, per_component, experts,
        expert_refusal(family, lora), lora.init,
    )  # fmt: skip


def apply(
    model: Any, lora: LoraSection, lora_plan: LoraPlan, *, seed: int, adapter: Path | None = None
) -> Any:
    """The model with adapters attached (or every weight trainable for method: full).

    ``seed`` fixes the random lora_A initialisation: without it two runs of one recipe start
    from the same loss but part ways from the second step on. ``adapter``: an earlier run's
    adapter folder, attached trainable under peft's "default" name instead of a fresh adapter
    (vlmtune.after.trained.start_from checked that it has this plan's shape); lora.dropout applies to it.
    """
    if lora_plan.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import torch
    from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model

    from vlmtune.model.peft_targets import keep_lora_targets_as_named

    keep_lora_targets_as_named(model)  # the plan names this model's modules: no transformers-4 rewrite
    if adapter is not None:
        config = PeftConfig.from_pretrained(str(adapter))
        config.lora_dropout = lora.dropout  # a training setting, not part of the adapter's shape
        return PeftModel.from_pretrained(model, str(adapter), config=config, is_trainable=True)

    config = LoraConfig(
        use_dora=lora.method == "dora",
        init_lora_weights=PEFT_INIT[lora.init],
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        bias=lora.bias,
        # A plan of experts alone targets no Linear: peft takes an empty list, not a regex matching none.
        target_modules=lora_plan.regex if lora_plan.targets else [],
        target_parameters=list(lora_plan.expert_parameters) or None,
        modules_to_save=list(lora_plan.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    model = get_peft_model(model, config)
    if lora.init == "loftq":  # from the 4-bit weights' quantization error, read against the checkpoint's
        from vlmtune.model.loftq import start_from_quantization_error

        start_from_quantization_error(model)
    return model


# --- artifacts --------------------------------------------------------------------------------


def trainable_report(
    model: Any, family: Family, lora_plan: LoraPlan, rates: GroupRates | None = None
) -> dict:
    """The lora_plan.json content: every targeted module, trainable params per component, DoRA's magnitude
    vectors, and the optimizer groups ``rates`` makes (train.lr_vision & co., LoRA+; null: one rate)."""
    params = list(modelinfo.parameters(model, family))
    trainable = modelinfo.per_component(params, lambda p: p.numel if p.trainable else 0)
    magnitudes = [p for p in params if DORA_MAGNITUDE in p.name and p.trainable]
    return {
        "method": lora_plan.method,
        "init": lora_plan.init,
        "dora_magnitude_vectors": len(magnitudes),
        "dora_magnitude_params": sum(p.numel for p in magnitudes),
        "optimizer_groups": plan_report(rates, model),
        "regex": lora_plan.regex,
        "targets": list(lora_plan.targets),
        "targets_per_component": lora_plan.targets_per_component,
        "modules_to_save": list(lora_plan.modules_to_save),
        "expert_parameters": list(lora_plan.expert_parameters),
        "experts_refused": lora_plan.experts_refused,
        "trainable_params": trainable,
        "trainable_total": sum(trainable.values()),
        "params_total": sum(p.numel for p in params),
    }


def write_artifacts(
    run: RunDir, model: Any, family: Family, lora_plan: LoraPlan, train: TrainSection | None = None
) -> None:
    """2-lora/: the plan with trainable counts and the optimizer groups ``train`` asks for (a RecipeError
    for a component rate where nothing trains), and peft's adapter config."""
    rates = GroupRates.from_train(train, family) if train is not None else None
    run.write_json(rundir.LORA_PLAN, trainable_report(model, family, lora_plan, rates))
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None:
        run.write_json(rundir.ADAPTER_CONFIG, peft_config.to_dict())
