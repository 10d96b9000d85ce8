"""Stage 1, load: find the checkpoint, detect its family, load it with selective quantization.

The language model's Linears go to 4-bit NF4 (or 8-bit); the vision tower, the projector and
lm_head stay in 16-bit, named by full module prefixes (bitsandbytes matches prefixes, not
substrings: a bare "visual" would quantize the vision tower silently).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError
from vlmtune.families import COMPONENTS, Family, detect_family
from vlmtune.recipe import TINY_PREFIX, ModelSection, QuantizationSection


@dataclass
class Loaded:
    model: Any
    processor: Any
    family: Family
    path: str  # local folder or hub id the weights came from
    report: dict


def resolve_model_path(name: str) -> str:
    """tiny:FAMILY -> the cached tiny checkpoint; a folder -> itself; anything else is a hub id."""
    if name.startswith(TINY_PREFIX):
        from vlmtune.tiny import tiny_model_path

        return str(tiny_model_path(name[len(TINY_PREFIX) :]))
    return name


def read_config(path: str, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a model checkpoint",
            hint="point model.name at the folder that holds config.json and the weights",
        )
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the model config of {path!r}: {str(exc).splitlines()[0]}",
            hint="give a local checkpoint folder, a reachable hub id (log in with `hf auth login` for gated "
            "models), or tiny:FAMILY for an offline test model",
        ) from None


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "train.device is cuda but no CUDA device is visible", hint="use train.device: auto or cpu"
        )
    return requested


def free_memory(device: str) -> int | None:
    """Bytes free on the device now: CUDA's free memory, or the RAM available on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def quantization_config(quant: QuantizationSection, family: Family, compute_dtype: Any) -> Any:
    if quant.bits is None:
        return None
    from transformers import BitsAndBytesConfig

    # A custom skip list replaces the default one, so lm_head is part of family.keep_16bit().
    skip = [*family.keep_16bit(), *quant.keep_16bit]
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip,
    )


def load(
    model: ModelSection, quant: QuantizationSection, max_image_pixels: int | None, device: str
) -> Loaded:
    """The model on ``device`` and its processor, with the pixel budget applied."""
    import torch
    from transformers import AutoModelForImageTextToText

    from vlmtune.processing import load_processor

    path = resolve_model_path(model.name)
    family = detect_family(read_config(path, model.revision))
    dtype = getattr(torch, model.dtype)
    loaded = AutoModelForImageTextToText.from_pretrained(
        path,
        revision=model.revision,
        dtype=dtype,
        quantization_config=quantization_config(quant, family, dtype),
        device_map={"": device},
        attn_implementation=model.attn_implementation,
    )
    check_keep_16bit(loaded, quant.keep_16bit)
    keep_quantized_layers_trainable(loaded)
    processor = load_processor(path, family, max_image_pixels, revision=model.revision)
    return Loaded(loaded, processor, family, path, model_report(loaded, family))


def check_keep_16bit(model: Any, prefixes: list[str]) -> None:
    names = [name for name, _ in model.named_modules()]
    for prefix in prefixes:
        if not any(n == prefix or n.startswith(prefix + ".") for n in names):
            raise ModelError(
                f"quantization.keep_16bit entry {prefix!r} names no module of this model",
                hint="write full module prefixes as `vlmtune inspect` lists them, e.g. model.language_model.layers.0",
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


# --- report ----------------------------------------------------------------------------------


def is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)  # bnb Linear4bit / Linear8bitLt subclass nn.Linear


def is_quantized(module: Any) -> bool:
    weight = getattr(module, "weight", None)
    return type(weight).__name__ in ("Params4bit", "Int8Params")


def logical_numel(param: Any) -> int:
    """Parameters a tensor stands for (a packed 4-bit tensor holds two per byte)."""
    state = getattr(param, "quant_state", None)
    return state.shape.numel() if state is not None else param.numel()


def parameter_bytes(param: Any) -> int:
    """Bytes a parameter really holds, its bitsandbytes quantization state included."""
    total = param.numel() * param.element_size()
    state = getattr(param, "quant_state", None)
    if state is not None:
        total += _quant_state_bytes(state)
    scb = getattr(param, "SCB", None)
    if scb is not None:
        total += scb.numel() * scb.element_size()
    return total


def _quant_state_bytes(state: Any) -> int:
    total = 0
    for attr in ("absmax", "code"):
        tensor = getattr(state, attr, None)
        if tensor is not None:
            total += tensor.numel() * tensor.element_size()
    nested = getattr(state, "state2", None)
    if nested is not None:
        total += _quant_state_bytes(nested)
        offset = getattr(state, "offset", None)
        if offset is not None:
            total += offset.numel() * offset.element_size()
    return total


def model_report(model: Any, family: Family) -> dict:
    """Every Linear (name, component, dtype, 4-bit or not) and per-component params and bytes."""
    linears = []
    for name, module in model.named_modules():
        if is_linear(module):
            linears.append(
                {
                    "name": name,
                    "component": family.component_of(name),
                    "dtype": str(module.weight.dtype).removeprefix("torch."),
                    "quantized": is_quantized(module),
                    "in_features": module.in_features,
                    "out_features": module.out_features,
                }
            )
    components: dict[str, dict] = {
        c: {"params": 0, "bytes": 0, "linears": 0, "quantized_linears": 0} for c in COMPONENTS
    }
    for name, param in model.named_parameters(remove_duplicate=True):
        entry = components[family.component_of(name.rsplit(".", 1)[0])]
        entry["params"] += logical_numel(param)
        entry["bytes"] += parameter_bytes(param)
    for linear in linears:
        components[linear["component"]]["linears"] += 1
        components[linear["component"]]["quantized_linears"] += int(linear["quantized"])
    return {
        "family": family.name,
        "model_class": type(model).__name__,
        "components": components,
        "total_params": sum(c["params"] for c in components.values()),
        "total_bytes": sum(c["bytes"] for c in components.values()),
        "linears": linears,
    }
