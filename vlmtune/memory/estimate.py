"""How much GPU memory a fine-tuning step needs: every term summed, what fits, and the notes.

Pure functions: a ``ModelShape`` (vlmtune.memory.shape), a ``TrainingMethod`` (quantization,
LoRA, optimizer: how the model is stored and trained) and a ``Workload`` (batch, tokens, images)
in (vlmtune.memory.records), bytes out: ``estimate()``. vlmtune.memory.from_recipe builds the
inputs from a recipe, and ``vlmtune/commands/memory.py`` renders the result (rich table or JSON).

The model of a training step, term by term (docs/memory.md shows it against measurements); each
module's docstring documents the terms it computes:

- weights (vlmtune.memory.weights): every tensor as loaded, NF4/8-bit or 16-bit.
- lora, gradients, optimizer (vlmtune.memory.trainable): the tensors training updates, one
  gradient each, and the optimizer's states.
- activations, logits (vlmtune.memory.activations): what autograd saves per transformer layer,
  with and without gradient checkpointing, and the loss computation's peak.
- generation, reference (vlmtune.memory.objectives): the KV cache of grpo's sampling, and the
  frozen reference dpo and grpo measure against.
- overhead: the CUDA context, a constant (``CUDA_CONTEXT_BYTES``).
The terms are summed: gradients, activations and the loss buffer are treated as coexisting, so
the estimate leans towards an upper bound.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from vlmtune.choices import DTYPE_BYTES
from vlmtune.memory.activations import activation_bytes, layer_bytes, logits_bytes
from vlmtune.memory.objectives import generation_bytes, reference_bytes
from vlmtune.memory.records import (
    CUDA_CONTEXT_BYTES,
    DORA_SAVED_OUTPUTS,
    SEARCH_LIMIT,
    Fit,
    MemoryEstimate,
    TrainingMethod,
    Workload,
)
from vlmtune.memory.shape import ModelShape
from vlmtune.memory.trainable import Trainable, optimizer_bytes, trainable_tensors
from vlmtune.memory.weights import weight_components
from vlmtune.units import MiB, human_bytes, human_count


def estimate_terms(
    model: ModelShape, training: TrainingMethod, work: Workload
) -> tuple[dict[str, int], list[Trainable]]:
    trainable = trainable_tensors(model, training)
    weights = sum(c.bytes for c in weight_components(model, training))
    lora = 0 if training.method == "full" else sum(t.numel * t.itemsize for t in trainable)
    terms = {
        "weights": weights,
        "lora": lora,
        "gradients": sum(t.numel * t.itemsize for t in trainable),
        "optimizer": optimizer_bytes(trainable, training.optim),
        "activations": activation_bytes(model, training, work),
        "logits": logits_bytes(model, training, work),
    }
    if work.generations:
        terms["generation"] = generation_bytes(model, training, work)
    terms["reference"] = reference_bytes(model, training, lora)
    terms["overhead"] = CUDA_CONTEXT_BYTES
    return terms, trainable


def peak_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    return sum(estimate_terms(model, training, work)[0].values())


def fit(model: ModelShape, training: TrainingMethod, work: Workload, gpu_bytes: int) -> Fit:
    """Does it fit, and the largest batch size and text length that do (the other held fixed)."""
    peak = peak_bytes(model, training, work)
    batch = _largest(lambda b: peak_bytes(model, training, replace(work, batch_size=b)) <= gpu_bytes, 1)
    seq = _largest(lambda s: peak_bytes(model, training, replace(work, text_tokens=s)) <= gpu_bytes, 0)
    images = work.images_per_sample * work.image_tokens
    return Fit(
        gpu_bytes=gpu_bytes,
        fits=peak <= gpu_bytes,
        headroom_bytes=gpu_bytes - peak,
        max_batch_size=batch,
        max_seq_len=seq,
        max_sequence=seq + images if seq >= 0 else -1,
    )


def _largest(ok, low: int) -> int:
    """The largest n in [low, SEARCH_LIMIT] with ok(n), for ok monotone (true then false); low-1 if none."""
    if not ok(low):
        return low - 1
    hi = low + 1
    while hi <= SEARCH_LIMIT and ok(hi):
        low, hi = hi, hi * 2
    hi = min(hi, SEARCH_LIMIT + 1)
    while hi - low > 1:
        mid = (low + hi) // 2
        if ok(mid):
            low = mid
        else:
            hi = mid
    return low


def estimate(
    model: ModelShape, training: TrainingMethod, work: Workload, *, name: str = "", source: str = "",
    gpu_bytes: int | None = None, notes: Iterable[str] = (),
) -> MemoryEstimate:  # fmt: skip
    terms, trainable = estimate_terms(model, training, work)
    all_notes = [
        *notes,
        *_notes(training, trainable),
        *_checkpointing_notes(model, training, work),
        *_sampling_notes(work),
        *_expert_notes(model, training),
    ]
    expert_params = sum(p.numel for p in model.params if p.expert)
    return MemoryEstimate(
        model=name,
        family=model.family,
        components=weight_components(model, training),
        terms=terms,
        trainable_params=sum(t.numel for t in trainable),
        lora_targets=len(training.targets) if training.method == "lora" else 0,
        training=training,
        workload=work,
        notes=tuple(all_notes),
        fit=fit(model, training, work, gpu_bytes) if gpu_bytes is not None else None,
        source=source,
        active_params=model.active_params if model.experts else None,
        expert_params=expert_params,
    )


def _expert_notes(model: ModelShape, training: TrainingMethod) -> list[str]:
    """A mixture of experts: active vs total parameters, and what 4-bit does not reach."""
    expert = sum(p.numel for p in model.params if p.expert)
    if not expert:
        return []
    notes = [
        f"mixture of experts: {model.experts_per_token} of {model.experts} experts per token, "
        f"{human_count(model.active_params)} active of {human_count(model.total_params)} parameters; "
        "every expert is held in memory; the activations term leaves out the routed experts' own "
        "(about experts_per_token x an MLP's per token: a low estimate)"
    ]
    if training.quantized:
        notes.append(
            f"bitsandbytes cannot quantize the fused expert tensors ({human_count(expert)} parameters, 3-D, no "
            f"Linear): they stay {training.dtype}, {human_bytes(expert * DTYPE_BYTES[training.dtype])} of the "
            "weights; the router stays 16-bit too"
        )
    if training.expert_targets:
        notes.append(
            f"LoRA reaches the experts: {len(training.expert_targets)} fused expert tensors (peft target_parameters)"
        )
    return notes


# What each lora.init that decomposes the weights computes once, at the start
START_DECOMPOSITION = {
    "pissa": "an SVD",
    "olora": "a QR decomposition",
    "loftq": "an SVD of the quantization error (the 16-bit weight read from the checkpoint)",
}


def _notes(training: TrainingMethod, trainable: list[Trainable]) -> list[str]:
    notes = []
    if training.optim.startswith("paged_"):
        notes.append("paged optimizer: its states can spill to CPU memory under pressure (slower, no OOM)")
    if training.method == "full":
        notes.append(
            f"full fine-tuning: weights, gradients and AdamW states in {training.dtype}; no fp32 master copy "
            "(HF Trainer updates the weights in place)"
        )
    if training.dora:
        magnitudes = sum(t.numel for t in trainable if t.name.endswith(".lora_magnitude_vector"))
        notes.append(
            f"DoRA: a trained magnitude per output channel of each target ({human_count(magnitudes)} parameters in "
            f"the lora term); each target saves {DORA_SAVED_OUTPUTS} outputs more per token, and its forward builds "
            f"the whole weight{' (dequantized)' if training.quantized else ''}, B @ A and their sum for the channel "
            "norms (the largest target's in the activations term)"
        )
    if training.init in START_DECOMPOSITION:
        notes.append(
            f"lora.init {training.init}: before the first step, {START_DECOMPOSITION[training.init]} of each target's "
            "weight in fp32, one target at a time (a transient of a few fp32 copies of the largest weight, not in "
            "the terms above)"
        )
    if training.objective == "dpo":
        notes.append(
            "dpo: each pair is two sequences (chosen, rejected) and a no-grad reference forward; the reference "
            f"is {_reference_words(training)}"
        )
    elif training.objective == "kto":
        notes.append(
            "kto: each sample is one sequence with gradients, plus no-grad forwards of its KL sequence (the prompt "
            f"with another sample's answer) and of the reference; the reference is {_reference_words(training)}"
        )
    elif training.objective == "sft" and training.supervised_loss:
        notes.append(
            "logits: vlmtune's supervised loss projects at most "
            f"{training.chunk_bytes // MiB} MiB of fp32 logits at a time (train.supervised_loss)"
        )
    return notes


def _reference_words(training: TrainingMethod) -> str:
    """What a preference objective's reference costs, in words."""
    if training.method == "full":
        return "a frozen copy of the weights"
    return "the continued adapter, frozen" if training.continues_adapter else "the adapter disabled"


def _checkpointing_notes(model: ModelShape, training: TrainingMethod, work: Workload) -> list[str]:
    """Blocks that keep every activation although the recipe asks for gradient checkpointing."""
    if not training.gradient_checkpointing:
        return []
    missed = [(layer, full) for layer, tokens, full in layer_bytes(model, training, work)
              if tokens and not layer.checkpointable]  # fmt: skip
    if not missed:
        return []
    components = " and ".join(sorted({layer.component for layer, _ in missed}))
    total = sum(full for _, full in missed)
    return [
        f"gradient checkpointing does not reach the {len(missed)} {components} layers of this model (not "
        f"transformers GradientCheckpointingLayer blocks): they keep every activation, "
        f"{human_bytes(total)} of the activations term"
    ]


def _sampling_notes(work: Workload) -> list[str]:
    if not work.generations:
        return []
    return [
        f"generation: {work.generations} completions (batch_size x grad_accum) are sampled at once, each up to "
        f"{work.sequence:,} tokens with its prompt ({work.completion_tokens:,} new); the cache is freed before "
        "the loss, so the sum leans high"
    ]
