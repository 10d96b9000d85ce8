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
from vlmtune.recipe import LoraSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir


@dataclass(frozen=True)
class LoraPlan:
    method: str
    regex: str | None  # None for full fine-tuning
    targets: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    targets_per_component: dict[str, int] = field(default_factory=dict)
    # Fused expert tensors (3-D parameters, no Linears) LoRA reaches through peft's target_parameters.
    expert_parameters: tuple[str, ...] = ()
    experts_refused: str | None = None  # why the MLP toggle leaves the experts untrained (the family's word)


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
        "lora", target_regex(family, lora), targets, modules_to_save, per_component, experts,
        expert_refusal(family, lora),
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
    return get_peft_model(model, config)


# --- artifacts --------------------------------------------------------------------------------


def trainable_report(model: Any, family: Family, lora_plan: LoraPlan) -> dict:
    """The lora_plan.json content: every targeted module and trainable params per component."""
    params = list(modelinfo.parameters(model, family))
    trainable = modelinfo.per_component(params, lambda p: p.numel if p.trainable else 0)
    return {
        "method": lora_plan.method,
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


def write_artifacts(run: RunDir, model: Any, family: Family, lora_plan: LoraPlan) -> None:
    """2-lora/: the plan with trainable counts, and peft's adapter config."""
    run.write_json(rundir.LORA_PLAN, trainable_report(model, family, lora_plan))
    peft_config = getattr(model, "peft_config", {}).get("default")
    if peft_config is not None:
        run.write_json(rundir.ADAPTER_CONFIG, peft_config.to_dict())
