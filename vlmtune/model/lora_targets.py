"""Which Linears LoRA wraps: the recipe's toggles compiled into one anchored regex, matched by name.

Pure functions over module names, shared by the lora stage (names of the loaded model) and the
memory model (names of the meta-device model), so both always agree on what trains.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from vlmtune.errors import RecipeError
from vlmtune.model.families import Family, under

if TYPE_CHECKING:  # the toggles come in a LoraSection; model/ sits below recipe/
    from vlmtune.recipe import LoraSection


def target_regex(family: Family, lora: LoraSection) -> str:
    """Anchored regex of the Linears the toggles select (or the recipe's own regex)."""
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


def targets_experts(family: Family, lora: LoraSection) -> bool:
    """Do the toggles reach the fused experts (language layers and MLP on, a family that allows it)?

    Experts are no Linears: peft reaches them through ``target_parameters``. A recipe's own
    ``target_modules`` regex names Linears only, so it leaves the experts alone.
    """
    return (
        family.moe
        and family.expert_lora_refusal is None
        and not lora.target_modules
        and lora.finetune_language_layers
        and lora.finetune_mlp_modules
    )


def expert_refusal(family: Family, lora: LoraSection) -> str | None:
    """Why the toggles that would reach the experts do not (the family's documented refusal), or None."""
    wanted = (
        family.moe and not lora.target_modules and lora.finetune_language_layers and lora.finetune_mlp_modules
    )
    return family.expert_lora_refusal if wanted else None


def select_expert_parameters(
    family: Family, lora: LoraSection, param_names: Iterable[str]
) -> tuple[str, ...]:
    """The fused expert tensors LoRA wraps (full parameter names), empty when the toggles leave them."""
    if not targets_experts(family, lora):
        return ()
    experts = tuple(name for name in param_names if family.is_expert_parameter(name))
    if experts and lora.method == "dora":  # peft's wrapper of a fused tensor raises on use_dora
        raise RecipeError(
            f"lora.method dora cannot train the fused expert tensors of this {family.title} model: peft has no "
            "DoRA for a parameter that is not a Linear",
            hint="use lora.method lora, or set finetune_mlp_modules: false to leave the experts out of DoRA",
        )
    return experts


def select_targets(
    family: Family, lora: LoraSection, linear_names: Iterable[str], experts: Iterable[str] = ()
) -> tuple[str, ...]:
    """The Linear names the regex full-matches; a RecipeError when it is invalid, or when it matches
    none and no ``experts`` (fused expert tensors LoRA reaches besides) are targeted either."""
    regex = target_regex(family, lora)
    try:
        pattern = re.compile(regex)
    except re.error as exc:
        raise RecipeError(
            f"lora.target_modules is not a valid regex: {exc}", hint="test it with python's re"
        ) from None
    targets = tuple(name for name in linear_names if pattern.fullmatch(name))
    if not targets and not tuple(experts):
        refused = expert_refusal(family, lora)
        if refused:
            raise RecipeError(
                f"the LoRA toggles reach only the experts of this {family.title} model, and LoRA cannot train "
                f"them: {refused}",
                hint="add finetune_attention_modules: true (or the vision layers), or train with lora.method: full",
            )
        raise RecipeError(
            f"the LoRA targets match no Linear layer of this {family.title} model (regex {regex})",
            hint="check lora.target_modules against the names `vlmtune inspect` prints",
        )
    return targets


def present_projectors(family: Family, module_names: Iterable[str]) -> tuple[str, ...]:
    """The family's projector prefixes that name modules of this model (for train_projector)."""
    names = list(module_names)
    return tuple(p for p in family.projector_prefixes if any(under(n, p) for n in names))
