"""Per-GPU memory of a training step spread over N GPUs, under DDP and under FSDP.

Pure arithmetic over the one-GPU terms (vlmtune.memory.estimate) and the model's transformer
blocks (the Family record's ``block_lists``, found in the ``ModelShape`` by name):

- DDP: every GPU holds the whole model, its adapters, gradients and optimizer states, and
  trains on its own batch_size samples, so each GPU needs the one-GPU peak plus DDP's gradient
  buckets: a second copy of every trainable gradient, reduced across GPUs in buckets.
- FSDP (full shard, FSDP2): weights, adapters, gradients and optimizer states are split N ways;
  what a GPU holds whole is the root unit (everything outside the blocks: embeddings, lm_head,
  norms, projector, patch embedding; gathered for the whole step, an upper bound) and two blocks
  at a time (the running one and the prefetched next), plus the whole gradients of the root and
  of one block before they are reduce-scattered. Activations, logits and the CUDA context are
  per GPU as on one GPU (each GPU runs batch_size samples).
QLoRA's per-block quantization constants are counted as sharded with the weights; they are small.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from vlmtune.choices import DTYPE_BYTES
from vlmtune.memory.records import TrainingMethod
from vlmtune.memory.shape import ModelShape
from vlmtune.memory.trainable import trainable_tensors
from vlmtune.memory.weights import quantized_bytes, will_quantize

STRATEGIES = ("ddp", "fsdp")
GATHERED_BLOCKS = 2  # the block that runs and the one prefetched


@dataclass(frozen=True)
class PerGpu:
    strategy: str
    gpus: int
    terms: dict[str, int]

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    def to_json(self, gpu_bytes: int | None = None) -> dict:
        out = {"terms": dict(self.terms), "peak_bytes": self.peak_bytes}
        if gpu_bytes is not None:
            out["fits"] = self.peak_bytes <= gpu_bytes
        return out


def data_parallel(terms: dict[str, int], gpus: int) -> PerGpu:
    """DDP: the one-GPU terms plus the gradient buckets (none on one GPU)."""
    return PerGpu("ddp", gpus, {**terms, "buckets": terms["gradients"] if gpus > 1 else 0})


def fully_sharded(
    model: ModelShape,
    training: TrainingMethod,
    terms: dict[str, int],
    gpus: int,
    block_lists: tuple[str, ...],
) -> PerGpu:
    """FSDP full shard over ``gpus``: sharded states, plus what is gathered whole at the worst moment."""
    units = unit_bytes(model, training, block_lists)
    root = units.pop(ROOT, Unit())
    largest = max(units.values(), key=lambda unit: unit.params, default=Unit())
    gathered = root.params + root.grads + GATHERED_BLOCKS * largest.params + largest.grads

    def shard(value: int) -> int:
        return math.ceil(value / gpus)

    return PerGpu(
        "fsdp",
        gpus,
        {
            "weights": shard(terms["weights"]),
            "lora": shard(terms["lora"]),
            "gradients": shard(terms["gradients"]),
            "optimizer": shard(terms["optimizer"]),
            "gathered": gathered if gpus > 1 else 0,
            "activations": terms["activations"],
            "logits": terms["logits"],
            # A full fine-tune's frozen reference would be sharded like the weights; sampling is per GPU.
            **({"reference": shard(terms["reference"])} if terms.get("reference") else {}),
            **({"generation": terms["generation"]} if "generation" in terms else {}),
            "overhead": terms["overhead"],
        },
    )


ROOT = ""  # the unit of everything outside the blocks


@dataclass
class Unit:
    """One FSDP unit's bytes when gathered whole: its parameters as stored (adapters included), its gradients."""

    params: int = 0
    grads: int = 0


def unit_bytes(model: ModelShape, training: TrainingMethod, block_lists: tuple[str, ...]) -> dict[str, Unit]:
    """Bytes per FSDP unit: each block of the family's block lists, and the root (``ROOT``)."""
    blocks = "|".join(re.escape(path) for path in block_lists) or "(?!)"
    pattern = re.compile(rf"^({blocks})\.(\d+)\.")

    def unit_of(name: str) -> str:
        match = pattern.match(name)
        return f"{match.group(1)}.{match.group(2)}" if match else ROOT

    linears = {lin.name: lin for lin in model.linears}
    itemsize = DTYPE_BYTES[training.dtype]
    units: dict[str, Unit] = {}
    for p in model.params:
        if p.linear is not None and will_quantize(p.linear, training):
            size = quantized_bytes(p.numel, linears[p.linear].out_features, training)
        else:
            size = p.numel * itemsize
        units.setdefault(unit_of(p.name), Unit()).params += size
    for t in trainable_tensors(model, training):
        unit = units.setdefault(unit_of(t.name), Unit())
        unit.grads += t.numel * t.itemsize
        if (
            training.method != "full"
        ):  # adapters are tensors of their own; full fine-tuning trains the weights
            unit.params += t.numel * t.itemsize
    return units
