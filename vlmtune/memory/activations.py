"""What the forward keeps for backward: the activations and logits terms.

- activations: per transformer layer, the tensors autograd saves, counted from the layer's own
  Linear shapes (see ``layer_activation_elems``); with gradient checkpointing only each layer's
  input is kept plus one layer recomputed in backward, in the blocks checkpointing reaches
  (transformers' GradientCheckpointingLayer blocks and the ones vlmtune.model.checkpointing adds: all of a
  bundled model's). The language layers see text + image tokens; the vision layers see patches,
  and keep nothing when nothing in the tower trains. dpo counts two sequences per sample. DoRA
  (lora.method dora) adds what its adapters save per token and its largest target's whole-weight
  transient (``dora_weight_bytes``).
- logits: fp32 logits over the vocabulary times ``LOGITS_MULTIPLE``; vlmtune's supervised loss
  projects at most ``chunk_bytes`` of logits at once, TRL's plain loss the whole sequence.
  dpo and grpo score with TRL's chunked log-probabilities: one tile of at most
  ``TRL_TOKEN_TILE`` x ``TRL_VOCAB_TILE`` logits at a time.
"""

from __future__ import annotations

from collections.abc import Iterator

from vlmtune.choices import DTYPE_BYTES
from vlmtune.memory.records import (
    BOUNDARY_ELEMS,
    DORA_SAVED_OUTPUTS,
    DORA_WEIGHT_COPIES,
    LOGITS_MULTIPLE,
    TRL_TOKEN_TILE,
    TRL_VOCAB_TILE,
    TrainingMethod,
    Workload,
)
from vlmtune.memory.shape import Layer, ModelShape, layer_of


def vision_trains(model: ModelShape, training: TrainingMethod) -> bool:
    """Does backward reach into the vision tower (so its forward keeps activations)?"""
    if training.method == "full":
        return True
    linears = {lin.name: lin.component for lin in model.linears}
    return any(linears[name] == "vision" for name in training.targets)


def activation_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    """Activations at the worst point of backward, for one micro-batch.

    Without checkpointing every layer's saved tensors are alive when backward starts, and the
    largest layer's gradients of the same shapes come on top while it is processed. With
    checkpointing each layer keeps only its input; backward recomputes one layer at a time (its
    saved tensors, turned into gradients as it goes) and passes two hidden-sized gradients between
    layers. The bench (docs/memory.md) measured both shapes. A block checkpointing does not reach
    (``Layer.checkpointable`` False: Mllama's 40 vision layers before vlmtune.model.checkpointing covered
    them) keeps everything either way: measured on an H200, 24.6k 16-bit elements per position and
    layer, within 1% of its ``elems`` plus LoRA.
    """
    a = DTYPE_BYTES[training.dtype]
    text, patches = _positions(training, work)
    vision = vision_trains(model, training)
    kept = 0
    largest = 0  # one layer's saved tensors: recomputed (checkpointing) or its gradients (none)
    for layer, tokens, full in layer_bytes(model, training, work):
        checkpointed = training.gradient_checkpointing and layer.checkpointable
        kept += tokens * layer.width * a if checkpointed else full
        largest = max(largest, full)
    boundary = text * model.text_hidden * BOUNDARY_ELEMS * a
    if vision:
        boundary += patches * model.vision_hidden * BOUNDARY_ELEMS * a
    if training.gradient_checkpointing:  # gradients flowing between blocks in backward
        boundary += 2 * text * model.text_hidden * a
    return kept + largest + boundary + dora_weight_bytes(model, training)


def _positions(training: TrainingMethod, work: Workload) -> tuple[int, int]:
    """(language tokens, vision-tower positions) in one micro-batch."""
    rows = work.batch_size * training.sequences
    return rows * work.sequence, rows * work.images_per_sample * work.image_patches


def layer_bytes(
    model: ModelShape, training: TrainingMethod, work: Workload
) -> Iterator[tuple[Layer, int, int]]:
    """(layer, tokens it sees, bytes it saves for backward without checkpointing) for every block.
    A frozen vision tower sees its patches under no_grad-like conditions: it saves nothing."""
    a = DTYPE_BYTES[training.dtype]
    text, patches = _positions(training, work)
    vision = vision_trains(model, training)
    lora_extra = _lora_extra_per_layer(model, training)
    for layer in model.layers:
        tokens = (patches if vision else 0) if layer.component == "vision" else text
        yield layer, tokens, tokens * (layer.elems + lora_extra.get(layer.name, 0)) * a


def _lora_extra_per_layer(model: ModelShape, training: TrainingMethod) -> dict[str, int]:
    """Per layer and token: each adapter saves its r-wide hidden, and its dropout output if any; a DoRA
    adapter also its base output and its own output (out_features each), which the magnitude scales."""
    if training.method != "lora":
        return {}
    linears = {lin.name: lin for lin in model.linears}
    extra: dict[str, int] = {}
    for name in training.targets:
        key = layer_of(name)
        if key is not None:
            lin = linears[name]
            dora = DORA_SAVED_OUTPUTS * lin.out_features if training.dora else 0
            extra[key] = (
                extra.get(key, 0) + training.r + (lin.in_features if training.dropout > 0 else 0) + dora
            )
    return extra


def dora_weight_bytes(model: ModelShape, training: TrainingMethod) -> int:
    """DoRA's transient in each targeted Linear's forward: the whole weight (dequantized when 4-bit), the
    adapter's product B @ A and their sum, out x in each, for the norm of every output channel; the
    largest target's counts (one layer at a time)."""
    if not (training.dora and training.targets):
        return 0
    linears = {lin.name: lin for lin in model.linears}
    largest = max(linears[name].in_features * linears[name].out_features for name in training.targets)
    return DORA_WEIGHT_COPIES * largest * DTYPE_BYTES[training.dtype]


def logits_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    """The loss computation's peak: fp32 logits times ``LOGITS_MULTIPLE``.

    vlmtune's supervised loss projects only positions with a label, at most ``chunk_bytes`` of
    fp32 logits at a time; image tokens never carry a label, so every text token is the upper
    bound. The model's own loss projects the whole batch, image tokens included.
    """
    if training.objective in (
        "dpo",
        "kto",
        "grpo",
    ):  # TRL's tiles: one fp32 tile of logits, its slice of lm_head
        scored = work.completion_tokens if training.objective == "grpo" else work.text_tokens
        tokens = min(training.sequences * work.batch_size * scored, TRL_TOKEN_TILE)
        vocab = min(model.vocab_size, TRL_VOCAB_TILE)
        return (tokens + model.text_hidden) * vocab * 4
    if training.supervised_loss:
        labelled = work.batch_size * work.text_tokens
        positions = min(labelled, max(1, training.chunk_bytes // (4 * model.vocab_size)))
    else:
        positions = work.batch_size * work.sequence
    return int(positions * model.vocab_size * 4 * LOGITS_MULTIPLE)
