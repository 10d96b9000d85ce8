"""How much GPU memory a fine-tuning step needs: the arithmetic, term by term.

Pure functions: a ``ModelShape`` (vlmtune.memory.shape), a ``TrainingMethod`` (quantization,
LoRA, optimizer: how the model is stored and trained) and a ``Workload`` (batch, tokens, images)
in, bytes out: ``estimate()``. vlmtune.memory.from_recipe builds the inputs from a recipe, and
``vlmtune/commands/memory.py`` renders the result (rich table or JSON).

The model of a training step, term by term (docs/memory.md shows it against measurements):

- weights: 16-bit tensors 2 bytes/param; bitsandbytes NF4 packs two params per byte plus one
  fp32 absmax per 64-param block (0.5625 B/param), double quantization stores the absmax as
  uint8 plus one fp32 per 256 blocks and a 256-entry code (0.5165 B/param measured); 8-bit is
  1 byte/param plus one fp32 scale per output row. Only nn.Linear layers outside the family's
  ``keep_16bit()`` prefixes are quantized, exactly as the load stage asks bitsandbytes to.
- lora: r*(in+out) per targeted Linear, in bf16 when the base is quantized (TRL casts every
  trainable parameter of a quantized model to bf16) and in fp32 otherwise (peft upcasts
  adapters); full fine-tuning trains every weight in the model dtype.
- gradients: one per trainable parameter, in its dtype.
- optimizer: torch AdamW keeps two states in the parameter's dtype; bitsandbytes' 8-bit AdamW
  keeps two uint8 states plus blockwise fp32 maxima (tensors under 4096 params keep fp32
  states), the 32-bit paged one two fp32 states; SGD (no momentum) none.
- activations: per transformer layer, the tensors autograd saves, counted from the layer's own
  Linear shapes (see ``layer_activation_elems``); with gradient checkpointing only each layer's
  input is kept plus one layer recomputed in backward. The language layers see text + image
  tokens; the vision layers see patches, and keep nothing when nothing in the tower trains.
- logits: fp32 logits over the vocabulary times ``LOGITS_MULTIPLE``; vlmtune's supervised loss
  projects at most ``chunk_bytes`` of logits at once, TRL's plain loss the whole sequence.
- generation (objectives that sample, grpo): the KV cache of every sequence sampled at once
  (TRL generates a whole optimizer step's completions together: batch_size x grad_accum), each
  as long as the prompt plus the completion, over every language layer's keys and values; plus
  the fp32 logits and probabilities of one sampling step.
- overhead: the CUDA context, a constant.
- reference (preference tuning, dpo): each pair is two sequences (chosen, rejected), so the
  activations and the loss see twice the batch; the loss is TRL's chunked log-probabilities (one
  tile of at most ``TRL_TOKEN_TILE`` x ``TRL_VOCAB_TILE`` logits at a time). The reference model
  costs no second copy for LoRA (the adapter is disabled), a frozen fp32 copy of the adapter when
  it continues an earlier run's, and a second copy of the weights for full fine-tuning. Its
  no-grad forward frees each layer as it goes, within what backward needs later anyway. GRPO
  (with beta > 0) holds the same reference, and scores its completions with the same tiles.
The terms are summed: gradients, activations and the loss buffer are treated as coexisting, so
the estimate leans towards an upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, get_args

from vlmtune.choices import DTYPE_BYTES, Optimizer
from vlmtune.constants import LOSS_CHUNK_BYTES
from vlmtune.errors import VlmtuneError
from vlmtune.families import COMPONENTS, under
from vlmtune.memory.shape import ModelShape, Param, layer_of
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
SEQUENCES_PER_SAMPLE = {"sft": 1, "dpo": 2, "grpo": 1}  # dpo: a pair is its chosen and its rejected one
OPTIMIZERS = get_args(Optimizer)


# --- what the recipe chooses -----------------------------------------------------------------


@dataclass(frozen=True)
class TrainingMethod:
    """How the model is stored and trained: quantization, adapters, optimizer, checkpointing, loss."""

    dtype: str = "bfloat16"
    bits: int | None = 4  # 4 | 8 | None (16-bit)
    double_quant: bool = True
    keep_16bit: tuple[str, ...] = ()  # full module prefixes bitsandbytes leaves alone
    method: str = "lora"  # lora | full
    targets: tuple[str, ...] = ()  # names of the Linears LoRA wraps
    r: int = 16
    dropout: float = 0.0
    bias: str = "none"  # none | all | lora_only
    projector: tuple[str, ...] = ()  # projector prefixes trained fully (peft modules_to_save)
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = True
    supervised_loss: bool = True
    chunk_bytes: int = LOSS_CHUNK_BYTES
    objective: str = "sft"  # sft | dpo | grpo (train.objective)
    continues_adapter: bool = False  # model.adapter: the reference is a frozen copy of that adapter
    reference: bool = True  # dpo and grpo measure against a frozen reference (grpo: only with beta > 0)

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
                "method": training.method,
                "bits": training.bits or 16,
                "double_quant": training.double_quant,
                "dtype": training.dtype,
                "r": training.r,
                "lora_targets": self.lora_targets,
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
        return out


# --- pure arithmetic -------------------------------------------------------------------------------


def will_quantize(linear: str, training: TrainingMethod) -> bool:
    """bitsandbytes replaces every nn.Linear except those under a skip prefix."""
    return training.quantized and not any(under(linear, p) for p in training.keep_16bit)


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
    layers. The bench (docs/memory.md) measured both shapes.
    """
    a = DTYPE_BYTES[training.dtype]
    rows = work.batch_size * training.sequences
    text = rows * work.sequence
    patches = rows * work.images_per_sample * work.image_patches
    vision = vision_trains(model, training)
    lora_extra = _lora_extra_per_layer(model, training)
    kept = 0
    largest = 0  # one layer's saved tensors: recomputed (checkpointing) or its gradients (none)
    for layer in model.layers:
        tokens = (patches if vision else 0) if layer.component == "vision" else text
        full = tokens * (layer.elems + lora_extra.get(layer.name, 0)) * a
        kept += tokens * layer.width * a if training.gradient_checkpointing else full
        largest = max(largest, full)
    boundary = text * model.text_hidden * BOUNDARY_ELEMS * a
    if vision:
        boundary += patches * model.vision_hidden * BOUNDARY_ELEMS * a
    if training.gradient_checkpointing:  # gradients flowing between blocks in backward
        boundary += 2 * text * model.text_hidden * a
    return kept + largest + boundary


def _lora_extra_per_layer(model: ModelShape, training: TrainingMethod) -> dict[str, int]:
    """Per layer and token: each adapter saves its r-wide hidden, and its dropout output if any."""
    if training.method != "lora":
        return {}
    linears = {lin.name: lin for lin in model.linears}
    extra: dict[str, int] = {}
    for name in training.targets:
        key = layer_of(name)
        if key is not None:
            lin = linears[name]
            extra[key] = extra.get(key, 0) + training.r + (lin.in_features if training.dropout > 0 else 0)
    return extra


def logits_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    """The loss computation's peak: fp32 logits times ``LOGITS_MULTIPLE``.

    vlmtune's supervised loss projects only positions with a label, at most ``chunk_bytes`` of
    fp32 logits at a time; image tokens never carry a label, so every text token is the upper
    bound. The model's own loss projects the whole batch, image tokens included.
    """
    if training.objective in ("dpo", "grpo"):  # TRL's tiles: one fp32 tile of logits, its slice of lm_head
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


def kv_elems_per_token(model: ModelShape) -> int:
    """Key and value elements one token leaves in the cache, over every language layer (an upper
    bound for sliding-window and cross-attention layers, which keep fewer)."""
    return sum(
        lin.out_features
        for lin in model.linears
        if lin.component == "language" and lin.name.rsplit(".", 1)[-1] in ("k_proj", "v_proj")
    )


def generation_bytes(model: ModelShape, training: TrainingMethod, work: Workload) -> int:
    """Sampling: the KV cache of every sequence generated at once, plus one step's logits."""
    cache = work.generations * work.sequence * kv_elems_per_token(model) * DTYPE_BYTES[training.dtype]
    return cache + work.generations * model.vocab_size * 4 * SAMPLING_LOGITS


def reference_bytes(model: ModelShape, training: TrainingMethod, lora: int) -> int:
    """The frozen reference dpo (and grpo with beta > 0) measures against: none for a fresh adapter (it
    is disabled), a frozen copy of a continued adapter, a second copy of the weights for full fine-tuning."""
    if training.objective not in ("dpo", "grpo") or not training.reference:
        return 0
    if training.method == "full":
        return sum(c.bytes for c in weight_components(model, training))
    if training.continues_adapter:  # TRL's "ref" copy stays fp32 while a quantized model's adapter is bf16
        return lora * (2 if training.quantized else 1)
    return 0


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
    all_notes = [*notes, *_notes(training), *_sampling_notes(work)]
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
    )


def _notes(training: TrainingMethod) -> list[str]:
    notes = []
    if training.optim.startswith("paged_"):
        notes.append("paged optimizer: its states can spill to CPU memory under pressure (slower, no OOM)")
    if training.method == "full":
        notes.append(
            f"full fine-tuning: weights, gradients and AdamW states in {training.dtype}; no fp32 master copy "
            "(HF Trainer updates the weights in place)"
        )
    if training.objective == "dpo":
        reference = {
            "full": "a frozen copy of the weights",
            "lora": "the continued adapter, frozen" if training.continues_adapter else "the adapter disabled",
        }[training.method]
        notes.append(
            f"dpo: each pair is two sequences (chosen, rejected) and a no-grad reference forward; the reference "
            f"is {reference}"
        )
    elif training.objective == "sft" and training.supervised_loss:
        notes.append(
            "logits: vlmtune's supervised loss projects at most "
            f"{training.chunk_bytes // MiB} MiB of fp32 logits at a time (train.supervised_loss)"
        )
    return notes


def _sampling_notes(work: Workload) -> list[str]:
    if not work.generations:
        return []
    return [
        f"generation: {work.generations} completions (batch_size x grad_accum) are sampled at once, each up to "
        f"{work.sequence:,} tokens with its prompt ({work.completion_tokens:,} new); the cache is freed before "
        "the loss, so the sum leans high"
    ]
