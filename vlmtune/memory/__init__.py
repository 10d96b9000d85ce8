"""estimate-memory: how much GPU memory a fine-tuning step needs, before anything is downloaded.

Three layers, as accelerate's estimator does it:

1. ``shape``: the real architecture on the META device (no weights read or allocated): every
   parameter and Linear with its component, from the Family record: a ``ModelShape``.
2. ``estimate``: pure functions of a ``ModelShape``, a ``TrainingMethod`` (quantization, LoRA,
   optimizer) and a ``Workload`` (batch, tokens, images), both in ``records`` -> bytes per term,
   one module per group of terms: ``weights``, ``trainable`` (lora, gradients, optimizer),
   ``activations`` (activations, logits), ``objectives`` (dpo's and grpo's generation, reference).
3. ``from_recipe`` builds those inputs from a recipe (``configs`` finds the model's config);
   ``parallel`` spreads the terms over several GPUs (per-GPU peak under DDP and FSDP);
   ``vlmtune/commands/memory.py`` parses the CLI and renders the result.
"""

from vlmtune.memory.configs import ModelConfig, bundled_configs, read_bundled, resolve_config
from vlmtune.memory.estimate import estimate, peak_bytes
from vlmtune.memory.from_recipe import estimate_recipe, training_method, workload_for
from vlmtune.memory.parallel import PerGpu, data_parallel, fully_sharded, unit_bytes
from vlmtune.memory.records import (
    CUDA_CONTEXT_BYTES,
    LOGITS_MULTIPLE,
    ComponentBytes,
    Fit,
    MemoryEstimate,
    TrainingMethod,
    Workload,
)
from vlmtune.memory.shape import ModelShape, describe_model, shape_of
from vlmtune.memory.trainable import optimizer_bytes, trainable_tensors
from vlmtune.memory.weights import quantized_bytes, weight_components
from vlmtune.units import GiB, MiB

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "LOGITS_MULTIPLE",
    "ComponentBytes",
    "Fit",
    "GiB",
    "MemoryEstimate",
    "MiB",
    "ModelConfig",
    "ModelShape",
    "PerGpu",
    "TrainingMethod",
    "Workload",
    "bundled_configs",
    "data_parallel",
    "describe_model",
    "estimate",
    "estimate_recipe",
    "fully_sharded",
    "optimizer_bytes",
    "peak_bytes",
    "quantized_bytes",
    "read_bundled",
    "resolve_config",
    "shape_of",
    "trainable_tensors",
    "training_method",
    "unit_bytes",
    "weight_components",
    "workload_for",
]
