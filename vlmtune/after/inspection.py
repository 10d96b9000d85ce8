"""`vlmtune inspect`: what the load and lora stages make of a model, component by component.

The model is loaded and the LoRA plan applied exactly as training would (so trainable counts
are peft's own), then summarised as the plain, stable JSON the command prints or renders.
"""

from __future__ import annotations

from typing import Any

from vlmtune.model import modelinfo
from vlmtune.recipe import LoraSection, ModelSection, QuantizationSection


def inspect_model(
    model: ModelSection,
    quantization: QuantizationSection,
    lora: LoraSection,
    max_image_pixels: int | None,
    device: str,
) -> dict:
    """Run the load stage and the LoRA plan, and summarise them per component."""
    from vlmtune.model.checkpoint import choose_device
    from vlmtune.stages import load
    from vlmtune.stages import lora as lora_stage

    loaded = load.load(model, quantization, max_image_pixels, choose_device(device))
    storage = modelinfo.storage_per_component(list(modelinfo.parameters(loaded.model, loaded.family)))
    tied = modelinfo.tied_lm_head(loaded.model)
    plan = lora_stage.plan(loaded.model, loaded.family, lora)
    # Counts only: the start is irrelevant (pissa's SVDs, loftq's reads of the checkpoint are skipped)
    adapted = lora_stage.apply(loaded.model, lora.model_copy(update={"init": "kaiming"}), plan, seed=0)
    trainable = lora_stage.trainable_report(adapted, loaded.family, plan)
    return summarize(loaded, quantization, plan, trainable, storage, tied)


def summarize(loaded: Any, quantization: QuantizationSection, plan: Any, trainable: dict, storage: dict,
              tied: bool) -> dict:  # fmt: skip
    """The plain, stable JSON of `vlmtune inspect --json`."""
    report = loaded.report
    components = []
    for name, figures in report["components"].items():
        components.append(
            {
                "name": name,
                "params": figures["params"],
                "bytes": figures["bytes"],
                "dtypes": dict(sorted(storage[name].items(), key=lambda item: -item[1])),
                "linears": figures["linears"],
                "quantized_linears": figures["quantized_linears"],
                "lora_targets": plan.targets_per_component.get(name, 0),
                "trainable_params": trainable["trainable_params"][name],
                **({"tied_to_embeddings": tied} if name == "lm_head" else {}),
            }
        )
    return {
        "model": loaded.path,
        "family": loaded.family.name,
        "family_title": loaded.family.title,
        "model_class": report["model_class"],
        "packing": loaded.family.packing is not None,
        "packing_note": loaded.family.packing_note,
        "quantization": quantization_label(quantization),
        "method": plan.method,
        "lora_regex": plan.regex,
        "lora_targets": len(plan.targets),
        "lora_expert_tensors": len(
            plan.expert_parameters
        ),  # fused experts LoRA reaches (peft target_parameters)
        "modules_to_save": list(plan.modules_to_save),
        "lora_init": plan.init,
        # DoRA (lora.method dora): a trained magnitude vector per target, counted in trainable_params
        "dora_magnitude_vectors": trainable["dora_magnitude_vectors"],
        "dora_magnitude_params": trainable["dora_magnitude_params"],
        "components": components,
        "total_params": report["total_params"],
        "total_bytes": report["total_bytes"],
        "trainable_params": trainable["trainable_total"],
    }


def quantization_label(quantization: QuantizationSection) -> str | None:
    if quantization.bits is None:
        return None
    return f"4-bit {quantization.quant_type}" if quantization.bits == 4 else "8-bit"
