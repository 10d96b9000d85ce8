"""Stage 1, load: find the checkpoint, detect its family, load it with selective quantization.

The language model's Linears go to 4-bit NF4 (or 8-bit); the vision tower, the projector and
lm_head stay in 16-bit, named by full module prefixes (bitsandbytes matches prefixes, not
substrings: a bare "visual" would quantize the vision tower silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.errors import ModelError
from vlmtune.model import modelinfo
from vlmtune.model.checkpoint import detect
from vlmtune.model.families import COMPONENTS, Family, under
from vlmtune.recipe import ModelSection, QuantizationSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir


@dataclass
class Loaded:
    model: Any
    processor: Any
    family: Family
    path: str  # local folder or hub id the weights came from
    report: dict


def quantization_config(
    quant: QuantizationSection, family: Family, compute_dtype: Any, shardable: bool = False
) -> Any:
    """bitsandbytes' settings; ``shardable``: 4-bit weights stored in the 16-bit dtype, as FSDP needs."""
    if quant.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    # A custom skip list replaces the default one, so lm_head is part of family.keep_16bit().
    skip = [*family.keep_16bit(), *quant.keep_16bit]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    # FSDP shards every parameter of a block alike; packed 4-bit weights in a uint8 tensor would
    # not mix with the block's 16-bit ones (norms, LoRA), so they are packed into compute-dtype storage.
    storage = {"bnb_4bit_quant_storage": compute_dtype} if shardable else {}
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
        **storage,
    )


def load(
    model: ModelSection,
    quant: QuantizationSection,
    max_image_pixels: int | None,
    device: str,
    shardable: bool = False,
) -> Loaded:
    """The model on ``device`` and its processor, with the pixel budget applied.

    ``shardable``: the model will be sharded by FSDP, so 4-bit weights use the 16-bit storage dtype.
    """
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.checkpointing import checkpoint_every_block
    from vlmtune.model.peft_targets import keep_lora_targets_as_named
    from vlmtune.model.processing import load_processor
    from vlmtune.model.vision_input import cast_pixel_values_at_the_tower

    path, family = detect(model.name, model.revision)
    dtype = getattr(torch, model.dtype)
    loaded = AutoModelForImageTextToText.from_pretrained(
        path,
        revision=model.revision,
        dtype=dtype,
        quantization_config=quantization_config(quant, family, dtype, shardable),
        device_map={"": device},
        attn_implementation=model.attn_implementation,
    )
    keep_lora_targets_as_named(loaded)  # adapters load onto it as planned (vlmtune.model.peft_targets)
    cast_pixel_values_at_the_tower(loaded, family)  # Llama 4's tower takes pixels in any dtype
    check_keep_16bit(loaded, quant.keep_16bit)
    if shardable:
        check_quant_storage(loaded, dtype)
    keep_quantized_layers_trainable(loaded)
    checkpoint_every_block(loaded, family)  # train.gradient_checkpointing must reach Mllama's vision layers
    processor = load_processor(path, family, max_image_pixels, revision=model.revision)
    return Loaded(loaded, processor, family, path, model_report(loaded, family))


def check_keep_16bit(model: Any, prefixes: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    for prefix in prefixes:
        if not any(under(n, prefix) for n in names):
            raise ModelError(
                f"quantization.keep_16bit entry {prefix!r} names no module of this model",
                hint="write full module prefixes as `vlmtune inspect` lists them, e.g. model.language_model.layers.0",
            )


def check_quant_storage(model: Any, dtype: Any) -> None:
    """Every 4-bit weight stored in ``dtype``: FSDP cannot shard a block whose tensors differ in dtype."""
    odd = sorted(
        {f"{name} ({param.dtype})" for name, param in model.named_parameters()
         if type(param).__name__ == "Params4bit" and param.dtype != dtype}
    )  # fmt: skip
    if odd:
        raise ModelError(
            f"FSDP needs the 4-bit weights stored as {dtype}, but {len(odd)} are not, e.g. {odd[0]}",
            hint="this bitsandbytes does not honour bnb_4bit_quant_storage: upgrade bitsandbytes, or use "
            "train.distributed.strategy: ddp",
        )


def keep_quantized_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16 the first no-grad forward through a Linear4bit repacks its weight in
    place; later training forwards then get no gradient through that layer (FACTS.md). Evaluation
    during training, generation and reloading all pass through here first.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


# --- artifacts --------------------------------------------------------------------------------


def model_report(model: Any, family: Family) -> dict:
    """Every Linear (name, component, dtype, 4-bit or not) and per-component params and bytes."""
    linears = modelinfo.linears(model, family)
    params = list(modelinfo.parameters(model, family))
    counts = modelinfo.per_component(params, lambda p: p.logical)
    sizes = modelinfo.per_component(params, lambda p: p.bytes)
    components: dict[str, dict] = {
        c: {"params": counts[c], "bytes": sizes[c], "linears": 0, "quantized_linears": 0} for c in COMPONENTS
    }
    for linear in linears:
        components[linear["component"]]["linears"] += 1
        components[linear["component"]]["quantized_linears"] += int(linear["quantized"])
    return {
        "family": family.name,
        "model_class": type(model).__name__,
        "components": components,
        "total_params": sum(counts.values()),
        "total_bytes": sum(sizes.values()),
        "linears": linears,
    }


def write_artifacts(run: RunDir, loaded: Loaded) -> None:
    """1-load/: the model report and the processor as training will use it."""
    from vlmtune.model.processing import save_processor

    run.write_json(rundir.MODEL_REPORT, {"model": loaded.path, **loaded.report})
    save_processor(loaded.processor, run / rundir.PROCESSOR)
