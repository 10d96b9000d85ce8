"""The weights term: every tensor as the load stage leaves it, quantized or 16-bit.

16-bit tensors take 2 bytes/param; bitsandbytes NF4 packs two params per byte plus one fp32
absmax per 64-param block (0.5625 B/param), double quantization stores the absmax as uint8 plus
one fp32 per 256 blocks and a 256-entry code (0.5165 B/param measured); 8-bit is 1 byte/param
plus one fp32 scale per output row. Only nn.Linear layers outside the family's ``keep_16bit()``
prefixes are quantized, exactly as the load stage asks bitsandbytes to.
"""

from __future__ import annotations

import math

from vlmtune.choices import DTYPE_BYTES
from vlmtune.memory.records import (
    DQ_BLOCK,
    DQ_CODE_BYTES,
    NF4_BLOCK,
    NF4_CODE_BYTES,
    ComponentBytes,
    TrainingMethod,
)
from vlmtune.memory.shape import ModelShape
from vlmtune.model.families import COMPONENTS, skipped_by


def will_quantize(linear: str, training: TrainingMethod) -> bool:
    """bitsandbytes replaces every nn.Linear except those its skip list names (prefix, regex or suffix)."""
    return training.quantized and not skipped_by(linear, training.keep_16bit)


def quantized_bytes(numel: int, out_features: int, training: TrainingMethod) -> int:
    """Bytes of one quantized Linear weight, its quantization state included (measured layout)."""
    if training.bits == 8:
        return numel + 4 * out_features  # int8 weight + one fp32 scale (SCB) per row
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not training.double_quant:
        return packed + 4 * blocks + NF4_CODE_BYTES
    return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + NF4_CODE_BYTES + DQ_CODE_BYTES


def quant_label(training: TrainingMethod) -> str:
    if training.bits == 8:
        return "int8"
    return "nf4+dq" if training.double_quant else "nf4"


def weight_components(model: ModelShape, training: TrainingMethod) -> tuple[ComponentBytes, ...]:
    """Params, dtype and bytes of each component as loaded."""
    itemsize = DTYPE_BYTES[training.dtype]
    linears = {lin.name: lin for lin in model.linears}
    rows = []
    for component in COMPONENTS:
        params = quantized = nbytes = 0
        for p in model.params:
            if p.component != component:
                continue
            params += p.numel
            if p.linear is not None and will_quantize(p.linear, training):
                quantized += p.numel
                nbytes += quantized_bytes(p.numel, linears[p.linear].out_features, training)
            else:
                nbytes += p.numel * itemsize
        if component == "lm_head" and model.tied_lm_head:
            rows.append(ComponentBytes("lm_head", 0, "tied to embeddings", 0))
            continue
        if not params:
            continue
        if quantized == params:
            dtype = quant_label(training)
        elif quantized:
            dtype = f"{quant_label(training)} + {training.dtype}"
        else:
            dtype = training.dtype
        rows.append(ComponentBytes(component, params, dtype, nbytes, quantized))
    return tuple(rows)
