"""Reading a loaded model: which modules are Linear or 4-bit, what each parameter really holds.

One walk over the parameters serves the load stage's model report, the lora stage's trainable
report and `vlmtune inspect`; the memory model's meta-device shapes read the same counts.
Names are the base model's: a peft wrapper's prefixes and adapter segments are removed, so a
parameter lands in the same component before and after LoRA is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlmtune.model.families import COMPONENTS, Family

PEFT_PREFIX = "base_model.model."
PEFT_SEGMENTS = (".lora_A.", ".lora_B.", ".base_layer.", ".modules_to_save.default.", ".original_module.")
STORAGE_OF_QUANTIZED = {"Params4bit": "4-bit", "Int8Params": "int8"}


def is_linear(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear)  # bnb Linear4bit / Linear8bitLt subclass nn.Linear


def is_quantized_linear(module: Any) -> bool:
    """A Linear whose weight bitsandbytes holds in 4 or 8 bits."""
    return type(getattr(module, "weight", None)).__name__ in STORAGE_OF_QUANTIZED


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


def storage(param: Any) -> str:
    """How a parameter is stored: nf4 / fp4 / int8 for bitsandbytes weights, else its dtype."""
    kind = type(param).__name__
    if kind == "Params4bit":
        return getattr(param, "quant_type", None) or STORAGE_OF_QUANTIZED[kind]
    if kind in STORAGE_OF_QUANTIZED:
        return STORAGE_OF_QUANTIZED[kind]
    return str(param.dtype).removeprefix("torch.")


def tied_lm_head(model: Any) -> bool:
    """lm_head shares its weight with the input embeddings (Gemma, PaliGemma, InternVL...)."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embeddings is not None and head.weight is embeddings.weight


def base_module_name(param_name: str) -> str:
    """A parameter's name (peft-wrapped or not) -> the base model's module it belongs to."""
    name = param_name.removeprefix(PEFT_PREFIX)
    for segment in PEFT_SEGMENTS:
        name = name.replace(segment, ".")
    return name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class ParamInfo:
    name: str
    component: str
    numel: int  # elements the tensor holds (a packed 4-bit tensor: half its parameters)
    logical: int  # parameters it stands for
    bytes: int
    storage: str
    trainable: bool


def parameters(model: Any, family: Family) -> Iterator[ParamInfo]:
    """Every parameter once (tied ones are not repeated), with its component and real size."""
    for name, param in model.named_parameters(remove_duplicate=True):
        yield ParamInfo(
            name=name,
            component=family.component_of(base_module_name(name)),
            numel=param.numel(),
            logical=logical_numel(param),
            bytes=parameter_bytes(param),
            storage=storage(param),
            trainable=param.requires_grad,
        )


def per_component(infos: list[ParamInfo], value: Any) -> dict[str, int]:
    """Sum of ``value(info)`` per component, every component present (zero when empty)."""
    totals = dict.fromkeys(COMPONENTS, 0)
    for info in infos:
        totals[info.component] += value(info)
    return totals


def storage_per_component(infos: list[ParamInfo]) -> dict[str, dict[str, int]]:
    """Per component: parameters by storage type ("nf4", "int8", "bfloat16", ...)."""
    found: dict[str, dict[str, int]] = {c: {} for c in COMPONENTS}
    for info in infos:
        counts = found[info.component]
        counts[info.storage] = counts.get(info.storage, 0) + info.logical
    return found


def linears(model: Any, family: Family) -> list[dict]:
    """Every Linear: name, component, dtype, quantized or not, and its shape."""
    return [
        {
            "name": name,
            "component": family.component_of(name),
            "dtype": str(module.weight.dtype).removeprefix("torch."),
            "quantized": is_quantized_linear(module),
            "in_features": module.in_features,
            "out_features": module.out_features,
        }
        for name, module in model.named_modules()
        if is_linear(module)
    ]
