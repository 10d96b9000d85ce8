"""What the memory model takes and gives, and the constants its arithmetic rests on.

In: a ``TrainingMethod`` (quantization, LoRA, optimizer: how the model is stored and trained) and
a ``Workload`` (batch, tokens, images), beside the ``ModelShape`` (vlmtune.memory.shape). Out: a
``MemoryEstimate`` (bytes per component and per term, with a ``Fit`` against a GPU's memory), whose
``to_json()`` is the ``--json`` document. The arithmetic between them is vlmtune.memory.estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, get_args

from vlmtune.choices import Optimizer
from vlmtune.constants import LOSS_CHUNK_BYTES
from vlmtune.units import MiB

# --- constants of the model, each stated once ---------------------------------------------------

CUDA_CONTEXT_BYTES = 500 * MiB  # CUDA context + cuBLAS/cuDNN workspaces on a recent driver (~0.3-0.8 GB)
LOGITS_MULTIPLE = 3.0  # loss peak / one fp32 logits tensor, measured (bench/memory_accuracy.py)
SAMPLING_LOGITS = 2  # fp32 tensors over the vocabulary per sampled sequence: logits and probabilities
BOUNDARY_ELEMS = 4  # per token and channel outside the layers: embeddings, final norm (fp32), its output
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize (transformers' default)
NF4_CODE_BYTES = 16 * 4  # the 16-value NF4/FP4 code, fp32
DQ_BLOCK = 256  # double quantization: absmax values per nested block
DQ_CODE_BYTES = 256 * 4 + 4  # the nested 8-bit code (fp32) and its offset
BNB_OPTIM_BLOCK = 256  # bitsandbytes 8-bit optimizer blocksize
BNB_OPTIM_MIN_8BIT = 4096  # smaller tensors keep 32-bit states in bitsandbytes' 8-bit optimizers
BNB_OPTIM_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry quantization maps, one pair per optimizer
SEARCH_LIMIT = 2**20  # the largest batch size / sequence length "what fits" looks for
TRL_TOKEN_TILE = 4096  # TRL 1.16's chunked log-probabilities: tokens per projection tile
TRL_VOCAB_TILE = 32768  # ... and vocabulary entries per tile
# DoRA (peft): per token, each target saves its base output and its adapter output for the magnitude's
# gradient; its forward holds the weight, B @ A and their sum (out x in each) to take the channel norms.
DORA_SAVED_OUTPUTS = 2
DORA_WEIGHT_COPIES = 3
SEQUENCES_PER_SAMPLE = {
    "sft": 1,
    "dpo": 2,
    "grpo": 1,
    "kto": 1,
}  # dpo: a pair is its chosen and its rejected one
OPTIMIZERS = get_args(Optimizer)


# --- what the recipe chooses -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainingMethod:
    """How the model is stored and trained: quantization, adapters, optimizer, checkpointing, loss."""

    dtype: str = "bfloat16"
    bits: int | None = 4  # 4 | 8 | None (16-bit)
    double_quant: bool = True
    keep_16bit: tuple[str, ...] = ()  # full module prefixes bitsandbytes leaves alone
    method: str = "lora"  # lora | full (DoRA is lora with ``dora``)
    dora: bool = False  # lora.method dora: a trained magnitude per output channel of every target
    init: str = (
        "kaiming"  # lora.init: pissa, olora and loftq decompose each target once before the first step
    )
    targets: tuple[str, ...] = ()  # names of the Linears LoRA wraps
    expert_targets: tuple[str, ...] = ()  # fused expert tensors LoRA wraps (peft target_parameters)
    r: int = 16
    dropout: float = 0.0
    bias: str = "none"  # none | all | lora_only
    projector: tuple[str, ...] = ()  # projector prefixes trained fully (peft modules_to_save)
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = True
    supervised_loss: bool = True
    chunk_bytes: int = LOSS_CHUNK_BYTES
    objective: str = "sft"  # sft | dpo | grpo | kto (train.objective)
    continues_adapter: bool = False  # model.adapter: the reference is a frozen copy of that adapter
    reference: bool = True  # dpo, kto and grpo measure against a frozen reference (grpo: only with beta > 0)

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def sequences(self) -> int:
        """Sequences per sample in a batch: two for a preference pair."""
        return SEQUENCES_PER_SAMPLE[self.objective]


@dataclass(frozen=True)
class Workload:
    batch_size: int
    text_tokens: int  # per sample, image tokens excluded
    images_per_sample: int = 1
    image_tokens: int = 0  # language-model tokens one image becomes
    image_patches: int = 0  # vision-tower positions one image becomes
    image_size: tuple[int, int] | None = None  # (width, height), for the report
    steps_per_generation: int = 0  # micro-batches whose completions are sampled at once; 0: no sampling
    completion_tokens: int = 0  # new tokens per sampled completion, at most (part of text_tokens)

    @property
    def sequence(self) -> int:
        """Tokens per sample the language model sees, image tokens included."""
        return self.text_tokens + self.images_per_sample * self.image_tokens

    @property
    def generations(self) -> int:
        """Sequences sampled at once (TRL's generation batch)."""
        return self.batch_size * self.steps_per_generation


# --- the result ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ComponentBytes:
    name: str
    params: int
    dtype: str
    bytes: int
    quantized_params: int = 0


@dataclass(frozen=True)
class Fit:
    gpu_bytes: int
    fits: bool
    headroom_bytes: int
    max_batch_size: int  # at the given sequence length; 0 = not even one sample
    max_seq_len: int  # text tokens per sample at the given batch size; -1 = not even 0 text tokens
    max_sequence: int  # the same, image tokens included (what train.max_length must cover)

    def to_json(self) -> dict:
        return {
            "gpu_bytes": self.gpu_bytes,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "max_batch_size": self.max_batch_size,
            "max_seq_len": self.max_seq_len,
            "max_total_tokens": self.max_sequence,
        }


@dataclass(frozen=True)
class MemoryEstimate:
    model: str
    family: str
    components: tuple[ComponentBytes, ...]
    terms: dict[str, int]
    trainable_params: int
    lora_targets: int
    training: TrainingMethod
    workload: Workload
    notes: tuple[str, ...] = ()
    fit: Fit | None = None
    source: str = ""
    gpus: int = 1
    per_gpu: tuple = ()  # vlmtune.memory.parallel.PerGpu under DDP and FSDP, when spread over gpus > 1
    active_params: int | None = None  # per token, for a mixture of experts (None: dense, all of them)
    expert_params: int = 0  # fused expert tensors' parameters (kept 16-bit under 4-bit loading)

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components)

    @property
    def peak_bytes(self) -> int:
        return sum(self.terms.values())

    def to_json(self) -> dict:
        """The --json document; its keys are stable (scripts and `vlmtune train` rely on them)."""
        training, work = self.training, self.workload
        out: dict[str, Any] = {
            "model": self.model,
            "source": self.source,
            "family": self.family,
            "total_params": self.total_params,
            "active_params": self.total_params if self.active_params is None else self.active_params,
            "expert_params": self.expert_params,
            "trainable_params": self.trainable_params,
            "peak_bytes": self.peak_bytes,
            "components": [
                {
                    "name": c.name,
                    "params": c.params,
                    "dtype": c.dtype,
                    "bytes": c.bytes,
                    "quantized_params": c.quantized_params,
                }
                for c in self.components
            ],  # fmt: skip
            "terms": dict(self.terms),
            **self.terms,
            "inputs": {
                "method": "dora" if training.dora else training.method,
                "bits": training.bits or 16,
                "double_quant": training.double_quant,
                "dtype": training.dtype,
                "r": training.r,
                "lora_targets": self.lora_targets,
                "lora_expert_tensors": len(training.expert_targets),
                "optim": training.optim,
                "gradient_checkpointing": training.gradient_checkpointing,
                "supervised_loss": training.supervised_loss,
                "objective": training.objective,
                "sequences_per_sample": training.sequences,
                "batch_size": work.batch_size,
                "seq_len": work.text_tokens,
                "images_per_sample": work.images_per_sample,
                "image_size": list(work.image_size) if work.image_size else None,
                "image_tokens": work.image_tokens,
                "vision_patches": work.image_patches,
                "total_tokens": work.sequence,
                "generations": work.generations,
                "completion_tokens": work.completion_tokens,
            },
            "constants": {
                "cuda_context_bytes": CUDA_CONTEXT_BYTES,
                "logits_multiple": LOGITS_MULTIPLE,
            },
            "notes": list(self.notes),
        }
        if self.fit is not None:
            out["fits"] = self.fit.to_json()
        if self.per_gpu:
            gpu_bytes = self.fit.gpu_bytes if self.fit is not None else None
            out["gpus"] = self.gpus
            out["per_gpu"] = {p.strategy: p.to_json(gpu_bytes) for p in self.per_gpu}
        return out
