"""estimate-memory: how much GPU memory a fine-tuning step needs, before anything is downloaded.

Three layers, as accelerate's estimator does it:

1. ``describe_model(config)`` instantiates the real architecture on the META device (no weights
   are read or allocated) and writes down every parameter and every Linear with its component,
   from the Family record: a ``ModelShape``.
2. Pure functions turn a ``ModelShape``, a ``Setup`` (quantization, LoRA, optimizer: the recipe's
   choices) and a ``Workload`` (batch, tokens, images) into bytes: ``estimate()``.
3. ``vlmtune/commands/memory.py`` renders the result (rich table or JSON).

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
- overhead: the CUDA context, a constant.
The terms are summed: gradients, activations and the loss buffer are treated as coexisting, so
the estimate leans towards an upper bound.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError, VlmtuneError
from vlmtune.families import COMPONENTS, Family, ImageSettings

MiB = 2**20
GiB = 2**30

# --- constants of the model, each stated once ---------------------------------------------------

CUDA_CONTEXT_BYTES = 500 * MiB  # CUDA context + cuBLAS/cuDNN workspaces on a recent driver (~0.3-0.8 GB)
LOGITS_MULTIPLE = 3.0  # loss peak / one fp32 logits tensor, measured (bench/memory_accuracy.py)
NORM_ELEMS = 2  # an RMSNorm saves its input upcast to fp32: two 16-bit elements per channel
BOUNDARY_ELEMS = 4  # per token and channel outside the layers: embeddings, final norm (fp32), its output
NF4_BLOCK = 64  # bitsandbytes 4-bit blocksize (transformers' default)
NF4_CODE_BYTES = 16 * 4  # the 16-value NF4/FP4 code, fp32
DQ_BLOCK = 256  # double quantization: absmax values per nested block
DQ_CODE_BYTES = 256 * 4 + 4  # the nested 8-bit code (fp32) and its offset
BNB_OPTIM_BLOCK = 256  # bitsandbytes 8-bit optimizer blocksize
BNB_OPTIM_MIN_8BIT = 4096  # smaller tensors keep 32-bit states in bitsandbytes' 8-bit optimizers
BNB_OPTIM_QMAP_BYTES = 2 * 256 * 4  # the two 256-entry quantization maps, one pair per optimizer
DEFAULT_IMAGE_SIDE = 1024  # image side when the recipe sets no pixel budget
SEARCH_LIMIT = 2**20  # the largest batch size / sequence length "what fits" looks for

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
OPTIMIZERS = ("adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "sgd")


# --- what the meta model tells -----------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One parameter tensor (tied ones appear once)."""

    name: str
    component: str
    numel: int
    linear: str | None = None  # the nn.Linear it is the weight of, if any
    embedding: bool = False


@dataclass(frozen=True)
class Linear:
    name: str
    component: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class Layer:
    """One transformer block, read from its Linear shapes."""

    name: str  # e.g. model.language_model.layers.3
    component: str  # vision | language | other
    width: int  # channels of the block's input (what a checkpoint keeps)
    elems: int  # 16-bit elements autograd saves per token in one forward, without LoRA


@dataclass(frozen=True)
class ModelShape:
    family: str
    title: str
    params: tuple[Param, ...]
    linears: tuple[Linear, ...]
    layers: tuple[Layer, ...]
    vocab_size: int
    text_hidden: int
    vision_hidden: int
    tied_lm_head: bool
    projector_prefixes: tuple[str, ...] = ()

    @property
    def total_params(self) -> int:
        return sum(p.numel for p in self.params)


# --- what the recipe chooses -----------------------------------------------------------------


@dataclass(frozen=True)
class Setup:
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
    chunk_bytes: int = 64 * MiB  # vlmtune.loss.DEFAULT_CHUNK_BYTES

    @property
    def quantized(self) -> bool:
        return self.bits is not None


@dataclass(frozen=True)
class Workload:
    batch_size: int
    text_tokens: int  # per sample, image tokens excluded
    images_per_sample: int = 1
    image_tokens: int = 0  # language-model tokens one image becomes
    image_patches: int = 0  # vision-tower positions one image becomes
    image_size: tuple[int, int] | None = None  # (width, height), for the report

    @property
    def sequence(self) -> int:
        """Tokens per sample the language model sees, image tokens included."""
        return self.text_tokens + self.images_per_sample * self.image_tokens


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
    setup: Setup
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
        setup, work = self.setup, self.workload
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
                "method": setup.method,
                "bits": setup.bits or 16,
                "double_quant": setup.double_quant,
                "dtype": setup.dtype,
                "r": setup.r,
                "lora_targets": self.lora_targets,
                "optim": setup.optim,
                "gradient_checkpointing": setup.gradient_checkpointing,
                "supervised_loss": setup.supervised_loss,
                "batch_size": work.batch_size,
                "seq_len": work.text_tokens,
                "images_per_sample": work.images_per_sample,
                "image_size": list(work.image_size) if work.image_size else None,
                "image_tokens": work.image_tokens,
                "vision_patches": work.image_patches,
                "total_tokens": work.sequence,
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


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def is_quantized(linear: str, setup: Setup) -> bool:
    """bitsandbytes replaces every nn.Linear except those under a skip prefix."""
    return setup.quantized and not any(under(linear, p) for p in setup.keep_16bit)


def quantized_bytes(numel: int, out_features: int, setup: Setup) -> int:
    """Bytes of one quantized Linear weight, its quantization state included (measured layout)."""
    if setup.bits == 8:
        return numel + 4 * out_features  # int8 weight + one fp32 scale (SCB) per row
    blocks = math.ceil(numel / NF4_BLOCK)
    packed = math.ceil(numel / 2)
    if not setup.double_quant:
        return packed + 4 * blocks + NF4_CODE_BYTES
    return packed + blocks + 4 * math.ceil(blocks / DQ_BLOCK) + NF4_CODE_BYTES + DQ_CODE_BYTES


def quant_label(setup: Setup) -> str:
    if setup.bits == 8:
        return "int8"
    return "nf4+dq" if setup.double_quant else "nf4"


def weight_components(model: ModelShape, setup: Setup) -> tuple[ComponentBytes, ...]:
    """Params, dtype and bytes of each component as loaded."""
    itemsize = DTYPE_BYTES[setup.dtype]
    linears = {lin.name: lin for lin in model.linears}
    rows = []
    for component in COMPONENTS:
        params = quantized = nbytes = 0
        for p in model.params:
            if p.component != component:
                continue
            params += p.numel
            if p.linear is not None and is_quantized(p.linear, setup):
                quantized += p.numel
                nbytes += quantized_bytes(p.numel, linears[p.linear].out_features, setup)
            else:
                nbytes += p.numel * itemsize
        if component == "lm_head" and model.tied_lm_head:
            rows.append(ComponentBytes("lm_head", 0, "tied to embeddings", 0))
            continue
        if not params:
            continue
        if quantized == params:
            dtype = quant_label(setup)
        elif quantized:
            dtype = f"{quant_label(setup)} + {setup.dtype}"
        else:
            dtype = setup.dtype
        rows.append(ComponentBytes(component, params, dtype, nbytes, quantized))
    return tuple(rows)


@dataclass(frozen=True)
class Trainable:
    name: str
    component: str
    numel: int
    itemsize: int
    embedding: bool = False


def trainable_tensors(model: ModelShape, setup: Setup) -> list[Trainable]:
    """Every tensor the optimizer updates, with its dtype size."""
    if setup.method == "full":
        itemsize = DTYPE_BYTES[setup.dtype]
        return [Trainable(p.name, p.component, p.numel, itemsize, p.embedding) for p in model.params]
    # TRL casts trainable parameters of a quantized model to bf16; peft keeps adapters in fp32 otherwise.
    lora_size = 2 if setup.quantized else 4
    copy_size = 2 if setup.quantized else DTYPE_BYTES[setup.dtype]
    linears = {lin.name: lin for lin in model.linears}
    out = []
    for name in setup.targets:
        lin = linears[name]
        out.append(Trainable(f"{name}.lora_A", lin.component, setup.r * lin.in_features, lora_size))
        out.append(Trainable(f"{name}.lora_B", lin.component, setup.r * lin.out_features, lora_size))
    for p in model.params:
        in_projector = any(under(p.name, prefix) for prefix in setup.projector)
        if in_projector:  # peft's modules_to_save: a trainable copy of the module
            out.append(Trainable(f"{p.name}.copy", p.component, p.numel, copy_size))
        elif _trains_bias(p, setup):
            out.append(Trainable(p.name, p.component, p.numel, copy_size))
    return out


def _trains_bias(p: Param, setup: Setup) -> bool:
    if not p.name.endswith(".bias") or setup.bias == "none":
        return False
    return setup.bias == "all" or p.linear in setup.targets


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


def layer_activation_elems(attention: list[Linear], mlp: list[Linear]) -> tuple[int, int]:
    """(input width, 16-bit elements saved per token) of one transformer block.

    The Family lists each tower's attention and MLP Linear names with the output projection last
    (o_proj, out_proj, attn.proj) and the down projection last (down_proj, fc2). Per token:
      attention: norm (fp32 input) + block input + q/k/v outputs + attention output + its copy
                 entering the output projection;
      MLP:       norm + input + first-stage outputs (gate/up or fc1) + activation output
                 (+ the gate*up product for gated MLPs).
    Fused attention kernels (sdpa/flash) keep no seq x seq matrix, so there is no quadratic term.
    """
    width = (attention or mlp)[0].in_features
    elems = 0
    if attention:
        qkv, out = attention[:-1] or attention, attention[-1]
        elems += NORM_ELEMS * width + width + sum(x.out_features for x in qkv) + 2 * out.in_features
    if mlp:
        first, down = mlp[:-1] or mlp, mlp[-1]
        hidden = first[0].in_features
        gated = 2 if len(first) >= 2 else 1
        elems += NORM_ELEMS * hidden + hidden + sum(x.out_features for x in first) + gated * down.in_features
    return width, elems


def vision_trains(model: ModelShape, setup: Setup) -> bool:
    """Does backward reach into the vision tower (so its forward keeps activations)?"""
    if setup.method == "full":
        return True
    linears = {lin.name: lin.component for lin in model.linears}
    return any(linears[name] == "vision" for name in setup.targets)


def activation_bytes(model: ModelShape, setup: Setup, work: Workload) -> int:
    """Activations at the worst point of backward, for one micro-batch.

    Without checkpointing every layer's saved tensors are alive when backward starts, and the
    largest layer's gradients of the same shapes come on top while it is processed. With
    checkpointing each layer keeps only its input; backward recomputes one layer at a time (its
    saved tensors, turned into gradients as it goes) and passes two hidden-sized gradients between
    layers. The bench (docs/memory.md) measured both shapes.
    """
    a = DTYPE_BYTES[setup.dtype]
    text = work.batch_size * work.sequence
    patches = work.batch_size * work.images_per_sample * work.image_patches
    vision = vision_trains(model, setup)
    lora_extra = _lora_extra_per_layer(model, setup)
    kept = 0
    largest = 0  # one layer's saved tensors: recomputed (checkpointing) or its gradients (none)
    for layer in model.layers:
        tokens = (patches if vision else 0) if layer.component == "vision" else text
        full = tokens * (layer.elems + lora_extra.get(layer.name, 0)) * a
        kept += tokens * layer.width * a if setup.gradient_checkpointing else full
        largest = max(largest, full)
    boundary = text * model.text_hidden * BOUNDARY_ELEMS * a
    if vision:
        boundary += patches * model.vision_hidden * BOUNDARY_ELEMS * a
    if setup.gradient_checkpointing:  # gradients flowing between blocks in backward
        boundary += 2 * text * model.text_hidden * a
    return kept + largest + boundary


def _lora_extra_per_layer(model: ModelShape, setup: Setup) -> dict[str, int]:
    """Per layer and token: each adapter saves its r-wide hidden, and its dropout output if any."""
    if setup.method != "lora":
        return {}
    linears = {lin.name: lin for lin in model.linears}
    extra: dict[str, int] = {}
    for name in setup.targets:
        key = layer_of(name)
        if key is not None:
            lin = linears[name]
            extra[key] = extra.get(key, 0) + setup.r + (lin.in_features if setup.dropout > 0 else 0)
    return extra


def logits_bytes(model: ModelShape, setup: Setup, work: Workload) -> int:
    """The loss computation's peak: fp32 logits times ``LOGITS_MULTIPLE``.

    vlmtune's supervised loss projects only positions with a label, at most ``chunk_bytes`` of
    fp32 logits at a time; image tokens never carry a label, so every text token is the upper
    bound. The model's own loss projects the whole batch, image tokens included.
    """
    if setup.supervised_loss:
        labelled = work.batch_size * work.text_tokens
        positions = min(labelled, max(1, setup.chunk_bytes // (4 * model.vocab_size)))
    else:
        positions = work.batch_size * work.sequence
    return int(positions * model.vocab_size * 4 * LOGITS_MULTIPLE)


def estimate_terms(model: ModelShape, setup: Setup, work: Workload) -> tuple[dict[str, int], list[Trainable]]:
    trainable = trainable_tensors(model, setup)
    weights = sum(c.bytes for c in weight_components(model, setup))
    lora = 0 if setup.method == "full" else sum(t.numel * t.itemsize for t in trainable)
    terms = {
        "weights": weights,
        "lora": lora,
        "gradients": sum(t.numel * t.itemsize for t in trainable),
        "optimizer": optimizer_bytes(trainable, setup.optim),
        "activations": activation_bytes(model, setup, work),
        "logits": logits_bytes(model, setup, work),
        "overhead": CUDA_CONTEXT_BYTES,
    }
    return terms, trainable


def peak_bytes(model: ModelShape, setup: Setup, work: Workload) -> int:
    return sum(estimate_terms(model, setup, work)[0].values())


def fit(model: ModelShape, setup: Setup, work: Workload, gpu_bytes: int) -> Fit:
    """Does it fit, and the largest batch size and text length that do (the other held fixed)."""
    peak = peak_bytes(model, setup, work)
    batch = _largest(lambda b: peak_bytes(model, setup, replace(work, batch_size=b)) <= gpu_bytes, 1)
    seq = _largest(lambda s: peak_bytes(model, setup, replace(work, text_tokens=s)) <= gpu_bytes, 0)
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
    model: ModelShape, setup: Setup, work: Workload, *, name: str = "", source: str = "",
    gpu_bytes: int | None = None, notes: Iterable[str] = (),
) -> MemoryEstimate:  # fmt: skip
    terms, trainable = estimate_terms(model, setup, work)
    all_notes = [*notes, *_notes(setup)]
    return MemoryEstimate(
        model=name,
        family=model.family,
        components=weight_components(model, setup),
        terms=terms,
        trainable_params=sum(t.numel for t in trainable),
        lora_targets=len(setup.targets) if setup.method == "lora" else 0,
        setup=setup,
        workload=work,
        notes=tuple(all_notes),
        fit=fit(model, setup, work, gpu_bytes) if gpu_bytes is not None else None,
        source=source,
    )


def _notes(setup: Setup) -> list[str]:
    notes = []
    if setup.optim.startswith("paged_"):
        notes.append("paged optimizer: its states can spill to CPU memory under pressure (slower, no OOM)")
    if setup.method == "full":
        notes.append(
            f"full fine-tuning: weights, gradients and AdamW states in {setup.dtype}; no fp32 master copy "
            "(HF Trainer updates the weights in place)"
        )
    if setup.supervised_loss:
        notes.append(
            "logits: vlmtune's supervised loss projects at most "
            f"{setup.chunk_bytes // MiB} MiB of fp32 logits at a time (train.supervised_loss)"
        )
    return notes


# --- layers from Linear names ----------------------------------------------------------------------

_LAYER = re.compile(r"^(.*\.\d+)\.")


def layer_of(name: str) -> str | None:
    """model.language_model.layers.3.self_attn.q_proj -> model.language_model.layers.3."""
    match = _LAYER.match(name)
    return match.group(1) if match else None


def _matches(name: str, suffixes: tuple[str, ...]) -> int | None:
    for i, suffix in enumerate(suffixes):
        if name == suffix or name.endswith("." + suffix):
            return i
    return None


def group_layers(linears: Iterable[Linear], family: Family) -> tuple[Layer, ...]:
    """Transformer blocks of the vision and language towers, from the family's Linear names."""
    names = {
        "vision": (family.vision_attention, family.vision_mlp),
        "language": (family.language_attention, family.language_mlp),
    }
    blocks: dict[str, tuple[str, dict[int, Linear], dict[int, Linear]]] = {}
    for lin in linears:
        if lin.component not in names:
            continue
        key = layer_of(lin.name)
        if key is None:
            continue
        attention_names, mlp_names = names[lin.component]
        _, attention, mlp = blocks.setdefault(key, (lin.component, {}, {}))
        i = _matches(lin.name, attention_names)
        if i is not None:
            attention[i] = lin
            continue
        i = _matches(lin.name, mlp_names)
        if i is not None:
            mlp[i] = lin
    layers = []
    for key, (component, attention, mlp) in blocks.items():
        if not attention and not mlp:
            continue
        width, elems = layer_activation_elems(
            [attention[i] for i in sorted(attention)], [mlp[i] for i in sorted(mlp)]
        )
        layers.append(Layer(key, component, width, elems))
    return tuple(layers)


# --- image tokens ----------------------------------------------------------------------------------


def _first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, float)) and value else None


def image_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """ImageSettings from config keys alone (no processor at hand), with the recipe's pixel budget.

    Reads the keys transformers configs use for the same idea, whatever the family: patch_size,
    spatial_merge_size / scale_factor / downsample_ratio, image_size, mm_tokens_per_image /
    image_seq_length / num_image_tokens (else (image_size / patch / merge)^2), image_grid_pinpoints.
    Tiling processors tile (their default), with as many tiles as the budget holds, and the
    longest edge is the budget's side rounded down to whole tiles (at least one), as the families'
    pixel-budget functions set it on a loaded processor.
    """
    vision = config.get("vision_config") or {}
    merge = vision.get("spatial_merge_size") or config.get("spatial_merge_size") or config.get("scale_factor")
    if not merge and config.get("downsample_ratio"):
        merge = round(1 / config["downsample_ratio"])
    merge = int(merge or 1)
    patch = _first_int(vision.get("patch_size")) or 14
    side = _first_int(vision.get("image_size"))
    per_tile = _first_int(
        config.get("mm_tokens_per_image") or config.get("image_seq_length") or vision.get("num_image_tokens")
    )
    if side and (per_tile is None or ((side // patch) ** 2) % per_tile):
        # A count that does not divide the tile's patches belongs to another tower (LlavaConfig's
        # default image_seq_length rides along in Pixtral configs): derive it from the geometry.
        per_tile = (side // patch // merge) ** 2
    budget_side = math.isqrt(max_image_pixels) if max_image_pixels else None
    longest_edge = max_tiles = None
    if side and budget_side:
        longest_edge = max(side, budget_side // side * side)
        max_tiles = max(1, max_image_pixels // (side * side))
    aspect = str(config.get("vision_aspect_ratio") or "")
    if aspect.startswith("anyres_max_"):
        max_tiles = int(aspect.removeprefix("anyres_max_"))
    return ImageSettings(
        max_pixels=max_image_pixels,
        patch_size=patch,
        merge_size=merge,
        image_size=side,
        tokens_per_tile=per_tile,
        max_tiles=_first_int(vision.get("max_num_tiles")) or max_tiles,
        tiling=True,
        longest_edge=longest_edge,
        grid_pinpoints=tuple(tuple(p) for p in config.get("image_grid_pinpoints") or ()),
    )


def image_patches(tokens: int, settings: ImageSettings, cross_attention_tiles: int | None = None) -> int:
    """Vision-tower positions behind ``tokens`` language tokens of one image.

    Towers of a fixed tile size see (image_size / patch)^2 patches for each tile's tokens_per_tile
    tokens; dynamic-resolution towers (no image_size) merge^2 patches per token. A tower the text
    reaches by cross-attention (Mllama: one text token per image) sees all its tiles.
    """
    if cross_attention_tiles and settings.image_size:
        return cross_attention_tiles * (settings.image_size // settings.patch_size) ** 2
    if settings.image_size and settings.tokens_per_tile:
        per_tile = (settings.image_size // settings.patch_size) ** 2
        return max(1, round(tokens * per_tile / settings.tokens_per_tile))
    return tokens * settings.merge_size**2


def image_settings_for(
    path: str | None, family: Family, config: Any, max_image_pixels: int | None
) -> tuple[ImageSettings, str | None]:
    """The family's own settings from the checkpoint's processor where its files are at hand (a
    local folder, a tiny model), with the pixel budget applied as training applies it; otherwise
    read from the config. Returns a note when the processor could not be used."""
    if path and (Path(path) / "preprocessor_config.json").is_file():
        from vlmtune.processing import load_processor

        try:
            processor = load_processor(path, family, max_image_pixels)
            return family.image_settings(processor), None
        except (VlmtuneError, OSError, ValueError, TypeError, AttributeError, ImportError) as exc:
            note = f"image tokens from the config: the processor did not load ({str(exc).splitlines()[0]})"
            return image_settings_from_config(config.to_dict(), max_image_pixels), note
    return image_settings_from_config(config.to_dict(), max_image_pixels), None


def image_tokens(family: Family, width: int, height: int, settings: ImageSettings) -> int:
    try:
        return int(family.tokens_per_image(width, height, settings))
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as exc:
        raise ModelError(
            f"cannot count the image tokens of a {width}x{height} image for {family.title}: {exc}",
            hint="give the count directly with --image-tokens N",
        ) from None


def default_image_size(max_image_pixels: int | None) -> tuple[int, int]:
    side = math.isqrt(max_image_pixels) if max_image_pixels else DEFAULT_IMAGE_SIDE
    return side, side


# --- configs: bundled, local, hub -----------------------------------------------------------------


def bundled_configs() -> dict[str, str]:
    """hub id -> file name of the configs shipped in vlmtune/configs/."""
    folder = resources.files("vlmtune") / "configs"
    out = {}
    for entry in folder.iterdir():
        if entry.name.endswith(".json"):
            out[entry.name.removesuffix(".json").replace("--", "/", 1)] = entry.name
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def read_bundled(hub_id: str) -> dict | None:
    by_lower = {k.lower(): v for k, v in bundled_configs().items()}
    file_name = by_lower.get(hub_id.lower())
    if file_name is None:
        return None
    text = (resources.files("vlmtune") / "configs" / file_name).read_text(encoding="utf-8")
    return json.loads(text)


@dataclass(frozen=True)
class ModelConfig:
    config: Any  # a transformers PretrainedConfig
    source: str  # where it came from, for the report
    folder: str | None = None  # the local checkpoint folder, when there is one


def resolve_config(name: str, revision: str | None = None) -> ModelConfig:
    """The config of a bundled hub id, a local folder, tiny:FAMILY, or (last) a hub id."""
    from transformers import AutoConfig

    from vlmtune.recipe import TINY_PREFIX
    from vlmtune.stages.load import read_config, resolve_model_path

    bundled = read_bundled(name) if not name.startswith(TINY_PREFIX) else None
    if bundled is not None:
        return ModelConfig(
            AutoConfig.for_model(**bundled), f"bundled config of {bundled.get('_name_or_path', name)}"
        )
    path = resolve_model_path(name)
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelConfig(read_config(str(local), revision), f"{local}/config.json", str(local))
    if name.startswith((".", "/", "~")) or local.suffix == ".json" or local.exists():
        raise ModelError(
            f"model {name!r} is not a folder with a config.json",
            hint="give a checkpoint folder, a hub id, or one of the bundled configs (vlmtune estimate-memory "
            "--list-models)",
        )
    try:
        return ModelConfig(read_config(path, revision), f"hub config of {name}")
    except ModelError as exc:
        close = _close_ids(name)
        raise ModelError(
            f"no config for model {name!r}: not bundled, not a local folder, and the hub did not answer "
            f"({exc.message})",
            hint=(f"did you mean {' or '.join(close)}? " if close else "")
            + "bundled configs work offline (--list-models); a local folder needs its config.json",
        ) from None


def _close_ids(name: str) -> list[str]:
    import difflib

    ids = list(bundled_configs())
    by_lower = {i.lower(): i for i in ids}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.6)
    return [by_lower[c] for c in close]


# --- the meta model ---------------------------------------------------------------------------------


def describe_model(config: Any) -> ModelShape:
    """Parameter and Linear shapes of the real architecture, instantiated on the meta device."""
    from vlmtune.families import detect_family

    family = detect_family(config)
    return _describe(family, config.to_json_string(use_diff=False))


@cache
def _describe(family: Family, config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.initialization import no_init_weights
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        config = AutoConfig.for_model(**json.loads(config_json))
        with torch.device("meta"), no_init_weights():
            model = AutoModelForImageTextToText.from_config(config)
        model.tie_weights()  # skipped under no_init_weights; tied tensors must appear once
    finally:
        logging.set_verbosity(verbosity)
    return shape_of(model, family)


def shape_of(model: Any, family: Family) -> ModelShape:
    """A ModelShape from any instantiated model (meta, CPU or GPU)."""
    import torch

    linears, embeddings = [], set()
    linear_weights: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears.append(
                Linear(name, family.component_of(name), module.in_features, module.out_features,
                       module.bias is not None)
            )  # fmt: skip
            linear_weights[f"{name}.weight"] = name
        elif isinstance(module, torch.nn.Embedding):
            embeddings.add(f"{name}.weight")
    params = []
    for name, param in model.named_parameters(remove_duplicate=True):
        numel = param.quant_state.shape.numel() if getattr(param, "quant_state", None) else param.numel()
        params.append(
            Param(name, family.component_of(name.rsplit(".", 1)[0]), numel, linear_weights.get(name),
                  name in embeddings)
        )  # fmt: skip
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    text = model.config.get_text_config()
    vision_cfg = getattr(model.config, "vision_config", None)
    vision_hidden = getattr(vision_cfg, "hidden_size", 0) or getattr(vision_cfg, "embed_dim", 0) or 0
    layers = group_layers(linears, family)
    vision_layers = [layer.width for layer in layers if layer.component == "vision"]
    return ModelShape(
        family=family.name,
        title=family.title,
        params=tuple(params),
        linears=tuple(linears),
        layers=layers,
        vocab_size=outputs.weight.shape[0] if outputs is not None else text.vocab_size,
        text_hidden=inputs.weight.shape[1],
        vision_hidden=vision_layers[0] if vision_layers else int(vision_hidden),
        tied_lm_head=outputs is not None and outputs.weight is inputs.weight,
        projector_prefixes=family.projector_prefixes,
    )


# --- from a recipe ------------------------------------------------------------------------------------


def setup_from_recipe(recipe: Any, model: ModelShape, family: Family) -> Setup:
    """The recipe's choices, with LoRA targets resolved by the lora stage's own regex."""
    from vlmtune.loss import DEFAULT_CHUNK_BYTES
    from vlmtune.stages.lora import target_regex

    lora, quant, train = recipe.lora, recipe.quantization, recipe.train
    targets: tuple[str, ...] = ()
    projector: tuple[str, ...] = ()
    if lora.method == "lora":
        pattern = re.compile(target_regex(family, lora))
        targets = tuple(lin.name for lin in model.linears if pattern.fullmatch(lin.name))
        if not targets:
            raise VlmtuneError(
                f"the LoRA targets match no Linear layer of this {family.title} model",
                hint="check lora.target_modules against the names `vlmtune inspect` prints",
            )
        if lora.train_projector:
            present = {p.name.rsplit(".", 1)[0] for p in model.params}
            projector = tuple(
                prefix for prefix in family.projector_prefixes if any(under(n, prefix) for n in present)
            )
    return Setup(
        dtype=recipe.model.dtype,
        bits=quant.bits,
        double_quant=quant.double_quant,
        keep_16bit=(*family.keep_16bit(), *quant.keep_16bit),
        method=lora.method,
        targets=targets,
        r=lora.r,
        dropout=lora.dropout,
        bias=lora.bias,
        projector=projector,
        optim=train.optim,
        gradient_checkpointing=train.gradient_checkpointing,
        supervised_loss=train.supervised_loss,
        chunk_bytes=DEFAULT_CHUNK_BYTES,
    )


def workload_for(
    config: Any,
    family: Family,
    recipe: Any,
    *,
    seq_len: int | None = None,
    images_per_sample: int = 1,
    image_size: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
    folder: str | None = None,
) -> tuple[Workload, list[str]]:
    """Batch and tokens: the recipe's worst case (max_length, the pixel budget) unless given.

    ``seq_len`` counts text tokens; without it the text fills ``train.max_length`` minus the
    image tokens. ``folder``: a local checkpoint whose processor files give the exact settings.
    """
    settings, note = image_settings_for(folder, family, config, recipe.data.max_image_pixels)
    notes = [note] if note else []
    width, height = image_size or default_image_size(recipe.data.max_image_pixels)
    if images_per_sample == 0:
        tokens = 0
    elif tokens_per_image is not None:
        tokens = tokens_per_image
    else:
        tokens = image_tokens(family, width, height, settings)
    text = seq_len
    if text is None:
        text = recipe.train.max_length - images_per_sample * tokens
        if text < 0:
            notes.append(
                f"{images_per_sample} image(s) of {tokens} tokens exceed train.max_length "
                f"{recipe.train.max_length}: such samples would be refused; estimated with no text"
            )
            text = 0
    work = Workload(
        batch_size=recipe.train.batch_size,
        text_tokens=text,
        images_per_sample=images_per_sample,
        image_tokens=tokens,
        image_patches=image_patches(tokens, settings, _cross_attention_tiles(config)) if tokens else 0,
        image_size=(width, height) if images_per_sample else None,
    )
    return work, notes


def _cross_attention_tiles(config: Any) -> int | None:
    """Tiles a cross-attention tower always sees (Mllama's max_num_tiles); None for the others."""
    return _first_int((config.to_dict().get("vision_config") or {}).get("max_num_tiles"))


def estimate_recipe(
    recipe: Any,
    *,
    gpu_bytes: int | None = None,
    seq_len: int | None = None,
    images_per_sample: int = 1,
    image_size: tuple[int, int] | None = None,
    tokens_per_image: int | None = None,
) -> MemoryEstimate:
    """The memory a recipe's training step needs; reads only the model's config, never its weights."""
    from vlmtune.families import detect_family

    resolved = resolve_config(recipe.model.name, recipe.model.revision)
    family = detect_family(resolved.config)
    model = describe_model(resolved.config)
    setup = setup_from_recipe(recipe, model, family)
    work, notes = workload_for(
        resolved.config, family, recipe, seq_len=seq_len, images_per_sample=images_per_sample,
        image_size=image_size, tokens_per_image=tokens_per_image, folder=resolved.folder,
    )  # fmt: skip
    return estimate(
        model, setup, work, name=recipe.model.name, source=resolved.source, gpu_bytes=gpu_bytes, notes=notes
    )


# --- parsing sizes --------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": GiB, "k": 2**10, "m": MiB, "g": GiB, "t": 2**40}


def parse_gpu_memory(text: str) -> int:
    """'24GB', '24 GiB', '80G', '16000MB', '24' (GB) -> bytes. GB and GiB both mean 2^30 bytes:
    cards sold as 24 GB hold 24 GiB."""
    match = _SIZE.match(text or "")
    if not match or float(match.group(1)) <= 0:
        raise VlmtuneError(
            f"cannot read --gpu-memory {text!r}",
            hint="write a positive size like 24GB, 80GiB, 16000MB or 24 (GB); GB means 2^30 bytes here",
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    return int(number * _UNITS[unit])


def parse_image_size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text or "")
    if not match or int(match.group(1)) <= 0 or int(match.group(2)) <= 0:
        raise VlmtuneError(f"cannot read --image-size {text!r}", hint="write WIDTHxHEIGHT, e.g. 1024x768")
    return int(match.group(1)), int(match.group(2))


def human_bytes(n: int | float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def human_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)
