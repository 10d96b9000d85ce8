"""What training updates, and what it costs besides the weights: the lora, gradients and
optimizer terms.

- lora: r*(in+out) per targeted Linear (DoRA: + out, its magnitude vector), in bf16 when the base is quantized (TRL casts every
  trainable parameter of a quantized model to bf16) and in fp32 otherwise (peft upcasts
  adapters); full fine-tuning trains every weight in the model dtype.
- gradients: one per trainable parameter, in its dtype.
- optimizer: torch AdamW keeps two states in the parameter's dtype; bitsandbytes' 8-bit AdamW
  keeps two uint8 states plus blockwise fp32 maxima (tensors under 4096 params keep fp32
  states), the 32-bit paged one two fp32 states; SGD (no momentum) none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from vlmtune.choices import DTYPE_BYTES
from vlmtune.errors import VlmtuneError
from vlmtune.memory.records import (
    BNB_OPTIM_BLOCK,
    BNB_OPTIM_MIN_8BIT,
    BNB_OPTIM_QMAP_BYTES,
    OPTIMIZERS,
    TrainingMethod,
)
from vlmtune.memory.shape import ModelShape, Param
from vlmtune.model.families import under


@dataclass(frozen=True)
class Trainable:
    name: str
    component: str
    numel: int
    itemsize: int
    embedding: bool = False


def trainable_tensors(model: ModelShape, training: TrainingMethod) -> list[Trainable]:
    """Every tensor the optimizer updates, with its dtype size."""
    if training.method == "full":
        itemsize = DTYPE_BYTES[training.dtype]
        return [Trainable(p.name, p.component, p.numel, itemsize, p.embedding) for p in model.params]
    # TRL casts trainable parameters of a quantized model to bf16; peft keeps adapters in fp32 otherwise.
    lora_size = 2 if training.quantized else 4
    copy_size = 2 if training.quantized else DTYPE_BYTES[training.dtype]
    linears = {lin.name: lin for lin in model.linears}
    out = []
    for name in training.targets:
        lin = linears[name]
        out.append(Trainable(f"{name}.lora_A", lin.component, training.r * lin.in_features, lora_size))
        out.append(Trainable(f"{name}.lora_B", lin.component, training.r * lin.out_features, lora_size))
        if training.dora:  # one magnitude per output channel
            out.append(Trainable(f"{name}.lora_magnitude_vector", lin.component, lin.out_features, lora_size))
    params = {p.name: p for p in model.params}
    for name in training.expert_targets:  # peft's ParamWrapper: A (r*E, in), B (out, r*E) per tensor
        experts, rows, cols = params[name].shape
        component = params[name].component
        out.append(Trainable(f"{name}.lora_A", component, training.r * experts * cols, lora_size))
        out.append(Trainable(f"{name}.lora_B", component, training.r * experts * rows, lora_size))
    for p in model.params:
        in_projector = any(under(p.name, prefix) for prefix in training.projector)
        if in_projector:  # peft's modules_to_save: a trainable copy of the module
            out.append(Trainable(f"{p.name}.copy", p.component, p.numel, copy_size))
        elif _trains_bias(p, training):
            out.append(Trainable(p.name, p.component, p.numel, copy_size))
    return out


def _trains_bias(p: Param, training: TrainingMethod) -> bool:
    if not p.name.endswith(".bias") or training.bias == "none":
        return False
    return training.bias == "all" or p.linear in training.targets


def optimizer_bytes(tensors: Iterable[Trainable], optim: str) -> int:
    if optim not in OPTIMIZERS:
        raise VlmtuneError(f"unknown optimizer {optim!r}", hint=f"choose one of {', '.join(OPTIMIZERS)}")
    total = 0
    quantized_states = False
    for t in tensors:
        if optim == "adamw_torch":
            total += 2 * t.numel * t.itemsize  # exp_avg, exp_avg_sq: zeros_like(param)
        elif optim in ("adamw_8bit", "paged_adamw_8bit"):
            # HF Trainer keeps embeddings in 32-bit states; bitsandbytes small tensors too.
            if t.embedding or t.numel < BNB_OPTIM_MIN_8BIT:
                total += 8 * t.numel
            else:
                total += 2 * t.numel + 2 * 4 * math.ceil(t.numel / BNB_OPTIM_BLOCK)
                quantized_states = True
        elif optim == "paged_adamw_32bit":
            total += 8 * t.numel
    return total + (BNB_OPTIM_QMAP_BYTES if quantized_states else 0)  # the maps are shared by all tensors
