"""Keep peft from rewriting vlmtune's LoRA targets as if the model were a transformers 4 checkpoint.

peft 0.21 converts a LoRA config for the model types whose experts transformers 5 fused (glm4v_moe,
qwen3_moe, deepseek_v3 ...: transformers' conversion pattern ``qwen2_moe``): every target whose name ends
in ``gate_proj``/``up_proj``/``down_proj`` becomes the fused expert parameter ``gate_up_proj``/``down_proj``
(with the rank doubled) and is dropped as a Linear target. That is right for an adapter trained on the
old per-expert Linears, and wrong for vlmtune's plan, which names the model's own (transformers 5)
modules: GLM-4.5V's dense MLP, shared expert and vision MLP Linears silently lost their LoRA, and the
experts got twice the planned rank. A model passed through here keeps the targets exactly as planned;
peft converts every other model as before.
"""

from __future__ import annotations

from typing import Any

MARK = "_vlmtune_lora_targets_as_named"


def keep_lora_targets_as_named(model: Any) -> None:
    """Mark ``model`` (the transformers model peft wraps) so peft applies its LoRA config unconverted."""
    _install()
    setattr(model, MARK, True)


def _install() -> None:
    """Wrap peft's conversion once: it skips marked models. peft imports it from this module at each call."""
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    if getattr(original, MARK, False):
        return

    def convert_unless_marked(peft_config: Any, model: Any, conversions: Any) -> None:
        if getattr(model, MARK, False):
            return
        original(peft_config, model=model, conversions=conversions)

    setattr(convert_unless_marked, MARK, True)
    conversion.convert_peft_config_for_transformers = convert_unless_marked
