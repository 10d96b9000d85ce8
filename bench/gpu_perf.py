"""The GPU benchmark's performance parts (issue 26): where a training step's time goes, the Triton
kernels against torch, and activation offloading. bench/gpu.py registers them; run them as one launch:

    bash bench/gpu.sh --parts workloads kernels offload          # the device tool: carry [".whl"]
    python bench/gpu.py --dry-run --parts workloads kernels offload   # CPU, tiny shapes (the test)

  workloads  two realistic workloads at real shapes with random weights: Qwen2-VL-2B in bf16 + LoRA and
             Qwen2.5-VL-7B in 4-bit + LoRA, 8 samples a step of one 896x896 or 1024x896 image (1024 or
             1152 image tokens: ~9k tokens a step), each trained by vlmtune and by the plain stack
             (``plain_arm``: TRL's SFTTrainer at its best documented settings for a VLM) in turn, in
             this process: tokens/s, MFU (``step_flops``), peak allocated and reserved, and for
             vlmtune a torch.profiler breakdown of two steps by class (``CLASSES``).
  kernels    each Triton kernel against its torch reference, forward + backward, at the 7B's layer
             shapes in bf16 (on CUDA): median ms, speed-up, max error. Its ``measured_faster`` is what
             vlmtune/kernels/patching.py's MEASURED_FASTER takes (the table `train.kernels: auto` reads).
  offload    the 2B workload with train.offload_activations off and on: peak allocated and step time.

In a dry run the kernels run under the Triton interpreter (TRITON_INTERPRET=1, fp32) and every figure
means nothing; the run checks the code paths.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

QWEN2_2B = "Qwen/Qwen2-VL-2B-Instruct"
QWEN25_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
# name -> (bundled config, family, quantization bits or None)
WORKLOADS = {
    "qwen2_vl_2b_bf16_lora": (QWEN2_2B, "qwen2_vl", None),
    "qwen2_5_vl_7b_4bit_lora": (QWEN25_7B, "qwen2_5_vl", 4),
}
DRY_2B = {
    "text_config": {
        "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
    },
    "vision_config": {"depth": 2, "embed_dim": 64, "hidden_size": 128, "num_heads": 2, "mlp_ratio": 2},
}  # fmt: skip
# Dense bf16 peak (no sparsity) of the cards the device tool lends, FLOP/s.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# The profiler's classes, in the order an op is tested against them (name patterns, lower case);
# ops under the vision tower's forward (a record_function range) count as "vision tower" first.
CLASSES: tuple[tuple[str, str], ...] = (
    ("4-bit dequantize", r"dequant|4bit|nf4|bnb"),
    ("attention", r"flash|attention|fmha|sdpa|softmax_backward|_efficient_attention|cudnn_attn"),
    ("loss", r"cross_entropy|nll_loss|log_softmax|logsumexp"),
    ("optimizer", r"adam|optimizer|_foreach|clip_grad|norm_\w*step"),
    ("norms/rotary/activations", r"norm|rsqrt|rotary|rope|silu|gelu|glu|tanh|sigmoid|_rms|_rotate|_cos_sin"),
    ("matmuls", r"gemm|matmul|\bmm\b|aten::mm|addmm|bmm|linear|cutlass|xmma|nvjet|_forward|_backward_input"),
)
VISION_RANGE = "vlmtune::vision_tower"
AGREEMENT = 2e-2  # a kernel's outputs and gradients within 2% of the largest value of torch's
DATA_RANGE = "enumerate(DataLoader)"


# --- MFU --------------------------------------------------------------------------------------------


def step_flops(
    language_params: int,
    vision_params: int,
    head_params: int,
    text_tokens: int,
    vision_patches: int,
    labelled_tokens: int,
    text_sequence_lengths: list[int],
    image_patch_counts: list[int],
    text_layers: int,
    text_width: int,
    vision_layers: int,
    vision_width: int,
    checkpointing: bool,
) -> float:
    """The FLOPs one training step performs, recompute counted.

    A Linear of P weights costs 2P FLOPs per token forward and 2P for the gradient of its input in
    backward (frozen weights need no weight gradient; LoRA's own are under 1% at r 16 and left out);
    gradient checkpointing runs the forward once more: 6P per token with it, 4P without. The language
    model sees every token (image tokens included), the vision tower every patch, lm_head only the
    labelled positions (vlmtune projects only those). Attention: QK^T and AV cost 4 s^2 d per layer
    forward (half with a causal mask), backward twice that, recompute once more: x4 (x3 without
    checkpointing) the forward; the vision tower's attention is counted as full attention per image.
    """
    k = 6 if checkpointing else 4
    linear = k * (
        language_params * text_tokens + vision_params * vision_patches + head_params * labelled_tokens
    )
    a = 4 if checkpointing else 3
    text_attention = a * text_layers * 2 * text_width * sum(s * s for s in text_sequence_lengths)
    vision_attention = a * vision_layers * 4 * vision_width * sum(n * n for n in image_patch_counts)
    return float(linear + text_attention + vision_attention)


def peak_flops(device_name: str) -> float | None:
    for card, flops in PEAK_BF16.items():
        if card in device_name:
            return flops
    return None


def linear_params(model: Any, family: Any) -> dict[str, int]:
    """Weights of the Linear layers (4-bit ones at their logical size) per component, LoRA's left out."""
    import torch

    counts = {"language": 0, "vision": 0, "projector": 0, "lm_head": 0}
    for name, module in model.named_modules():
        plain = name.removeprefix("base_model.model.")
        if not isinstance(module, torch.nn.Linear) or ".lora_" in plain:
            continue
        plain = plain.removesuffix(".base_layer")
        component = family.component_of(plain)
        if component in counts:
            counts[component] += module.in_features * module.out_features
    return counts


# --- the profiler breakdown -----------------------------------------------------------------------


def classify(name: str, inside_vision: bool) -> str:
    if inside_vision:
        return "vision tower"
    lowered = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, lowered):
            return label
    return "other"


def breakdown(events: Any, step_seconds: float, steps: int, device: str) -> dict:
    """Self time per class (device time on CUDA, CPU time on CPU) from a profiler's events; idle is the
    steps' wall time not covered by any op; data loading is the DataLoader's CPU time."""
    use_device = device == "cuda"
    totals: dict[str, float] = {}
    data_us = 0.0
    for event in events:
        if event.name.startswith(DATA_RANGE):
            data_us += event.cpu_time_total
            continue
        self_us = event.self_device_time_total if use_device else event.self_cpu_time_total
        if self_us <= 0 or event.name.startswith(("ProfilerStep", VISION_RANGE)):
            continue
        parent, inside = event.cpu_parent, False
        while parent is not None and not inside:
            inside = parent.name == VISION_RANGE
            parent = parent.cpu_parent
        label = classify(event.name, inside)
        totals[label] = totals.get(label, 0.0) + self_us
    busy_ms = sum(totals.values()) / 1000
    wall_ms = step_seconds * steps * 1000
    table = {label: round(us / 1000, 3) for label, us in sorted(totals.items(), key=lambda kv: -kv[1])}
    table["data loading"] = round(data_us / 1000, 3)
    table["idle"] = round(max(0.0, wall_ms - busy_ms - data_us / 1000), 3) if use_device else 0.0
    return {
        "time_kind": "device self time" if use_device else "CPU self time (dry run)",
        "steps": steps,
        "wall_ms": round(wall_ms, 3),
        "ms": table,
        "share": {label: round(ms / wall_ms, 4) if wall_ms else None for label, ms in table.items()},
    }


class VisionRange:
    """Forward hooks that open and close a record_function range around the vision tower."""

    def __init__(self, tower: Any):
        import torch

        self.ranges: list[Any] = []
        self.handles = [
            tower.register_forward_pre_hook(lambda m, a: self._open(torch)),
            tower.register_forward_hook(lambda m, a, o: self._close()),
        ]

    def _open(self, torch: Any) -> None:
        self.ranges.append(torch.profiler.record_function(VISION_RANGE).__enter__())

    def _close(self) -> None:
        if self.ranges:
            self.ranges.pop().__exit__(None, None, None)


def profiler_callback(first_step: int, steps: int, device: str, found: dict) -> Any:
    """A TrainerCallback that profiles optimizer steps [first_step, first_step + steps) and keeps their events."""
    import torch
    from transformers import TrainerCallback

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    class Profile(TrainerCallback):
        profiler = None
        vision = None
        started = 0.0

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            from vlmtune.model.families import detect_family

            family = detect_family(model.config)
            found["family"] = family
            found["linear_params"] = linear_params(model, family)
            tower = next(
                (
                    m
                    for n, m in model.named_modules()
                    if n.removeprefix("base_model.model.") == family.vision_prefix
                ),
                None,
            )
            self.vision = VisionRange(tower) if tower is not None else None

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == first_step:
                if device == "cuda":
                    torch.cuda.synchronize()
                self.profiler = torch.profiler.profile(activities=activities)
                self.profiler.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if self.profiler is not None and state.global_step == first_step + steps:
                if device == "cuda":
                    torch.cuda.synchronize()
                seconds = (time.perf_counter() - self.started) / steps
                self.profiler.__exit__(None, None, None)
                found["breakdown"] = breakdown(self.profiler.events(), seconds, steps, device)
                self.profiler = None

    return Profile()


class BatchShapes:
    """A collator wrapper: per batch, its sequence lengths, labelled tokens and image patches."""

    def __init__(self, collator: Callable, seen: list[dict]):
        self.collator, self.seen = collator, seen

    def __call__(self, rows: list) -> Any:
        batch = self.collator(rows)
        mask = batch.get("attention_mask")
        lengths = (
            mask.sum(-1).tolist()
            if mask is not None
            else [batch["input_ids"].shape[-1]] * len(batch["input_ids"])
        )
        grid = batch.get("image_grid_thw")
        patches = grid.prod(-1).tolist() if grid is not None else []
        labels = batch.get("labels")
        self.seen.append({
            "lengths": [int(x) for x in lengths], "patches": [int(x) for x in patches],
            "labelled": int((labels[..., 1:] != -100).sum()) if labels is not None else sum(lengths),
        })  # fmt: skip
        return batch


# --- parts ------------------------------------------------------------------------------------------


def plain_arm(
    ckpt: Path, data: Path, pixels: int, family_name: str, bits: int | None, s: Any, timer: Any
) -> dict:
    """The plain stack at its best documented settings for a VLM, on vlmtune's LoRA targets: TRL SFTTrainer,
    assistant_only_loss, gradient checkpointing (non-reentrant), bf16, Liger where it imports;
    padding-free is refused by TRL for vision models. Returns what it could and could not switch on."""
    import importlib.util

    import compare
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from vlmtune.model.families import get_family
    from vlmtune.model.lora_targets import target_regex
    from vlmtune.model.processing import load_processor
    from vlmtune.recipe import LoraSection

    family = get_family(family_name)
    processor = load_processor(ckpt, family, pixels)  # AutoProcessor minus the torchvision-only video part
    quantization = {}
    if bits:
        quantization["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=family.keep_16bit(),
        )  # fmt: skip
    placement = {"device_map": {"": s.device}} if s.device != "cpu" else {}
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, dtype=torch.bfloat16, **quantization, **placement
    )
    for module in model.modules():  # the CPU repacking trap (FACTS.md)
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    dataset = compare.trl_dataset(data)
    liger = s.device == "cuda" and importlib.util.find_spec("liger_kernel") is not None
    args = SFTConfig(
        output_dir=str(ckpt.parent / f"{ckpt.name}-plain"), max_steps=s.perf_steps,
        per_device_train_batch_size=s.perf_batch, gradient_accumulation_steps=1, learning_rate=1e-4,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=s.device == "cpu", bf16=True,
        gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=None,
        assistant_only_loss=True, seed=3407, disable_tqdm=True, use_liger_kernel=liger,
    )  # fmt: skip
    lora = LoraConfig(
        r=16, lora_alpha=16, target_modules=target_regex(family, LoraSection()), task_type="CAUSAL_LM"
    )
    settings = {"liger": liger, "padding_free": "refused by TRL for vision models", "assistant_only_loss": True,
                "gradient_checkpointing": True}  # fmt: skip
    try:
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora
        )
    except Exception as exc:  # Liger's patches fail on some transformers versions (FACTS.md): without it
        if not liger:
            raise
        settings["liger"] = f"failed: {str(exc).splitlines()[0][:200]}"
        args.use_liger_kernel = False
        trainer = SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=lora
        )
    with timer.watching():
        trainer.train()
    del trainer, model
    return settings


def write_recipe(
    path: Path, model: str, data: Path, pixels: int, bits: int | None, s: Any, **train: Any
) -> Path:
    import yaml

    recipe = {
        "model": {"name": model, "dtype": "bfloat16"},
        "quantization": {"bits": bits} if bits else {"bits": "none"},
        "lora": {"r": 16, "alpha": 16},
        "data": {"train": str(data), "max_image_pixels": pixels, "shuffle": False},
        "train": {
            "max_steps": s.perf_steps, "batch_size": s.perf_batch, "grad_accum": 1, "lr": 1e-4,
            "max_length": s.perf_max_length, "logging_steps": 1, "save_steps": 100_000, "group_by_length": False,
            "gradient_checkpointing": True, "device": s.device, **train,
        },
        "output": {"dir": str(path.parent)},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def perf_shape(hub_id: str, s: Any, dry_7b: dict) -> dict:
    from harness import bundled_config, merged

    if not s.shrink:
        return bundled_config(hub_id)
    return merged(bundled_config(hub_id), DRY_2B if hub_id == QWEN2_2B else dry_7b)


def train_measured(recipe: Path, run_dir: Path, device: str, extra_callbacks: list, shapes: list) -> dict:
    from harness import StepTimer, free_memory, reset_peak, run_vlmtune
    from transformers import Trainer

    timer = StepTimer(device)
    timer.callbacks.extend(extra_callbacks)
    original = Trainer.train

    def train(trainer, *args, **kwargs):  # inside the timer's own hook: our wrapper sees the batches first
        trainer.data_collator = BatchShapes(trainer.data_collator, shapes)
        return original(trainer, *args, **kwargs)

    reset_peak(device)
    started = time.perf_counter()
    Trainer.train = train
    try:
        with timer.watching():
            run_vlmtune(["train", str(recipe), "--run-dir", str(run_dir)])
    finally:
        Trainer.train = original
    free_memory(device)
    return {**timer.summary(), "seconds": time.perf_counter() - started}


WIDTHS = (1.0, 8 / 7)  # 896x896 and 1024x896 at the GPU's side


def workload_pixels(side: int) -> int:
    """The pixel budget that admits both image shapes unscaled."""
    return int(side * side * WIDTHS[1]) + 1


def workload(name: str, s: Any, work: Path, dry_7b: dict, device_name: str) -> dict:
    """vlmtune, then the plain stack, on one checkpoint and data set; peaks reset between them."""
    import shutil

    import compare
    from harness import StepTimer, build_random_checkpoint, free_memory, reset_peak
    from transformers import Trainer

    hub_id, family_name, bits = WORKLOADS[name]
    ckpt = work / f"{name}-checkpoint"
    config = perf_shape(hub_id, s, dry_7b)
    build_random_checkpoint(config, family_name, ckpt, s.device)
    data = compare.build_data(
        work / f"{name}-data", s.perf_image_side, n=s.perf_batch * s.perf_steps, widths=WIDTHS
    )
    pixels = workload_pixels(s.perf_image_side)
    recipe = write_recipe(work / name / "recipe.yaml", str(ckpt), data, pixels, bits, s)
    found: dict = {}
    shapes: list[dict] = []
    profile = profiler_callback(s.perf_profile_from, s.perf_profile_steps, s.device, found)
    ours = train_measured(recipe, work / name / "run", s.device, [profile], shapes)
    ours.update(mfu(found, shapes, ours, config, device_name))
    ours["breakdown"] = found.get("breakdown")

    timer, plain_found, plain_shapes = StepTimer(s.device), {}, []
    timer.callbacks.append(profiler_callback(-1, 0, s.device, plain_found))  # its Linear counts, no profile
    original = Trainer.train

    def train(trainer, *args, **kwargs):
        trainer.data_collator = BatchShapes(trainer.data_collator, plain_shapes)
        return original(trainer, *args, **kwargs)

    reset_peak(s.device)
    Trainer.train = train
    try:
        settings = plain_arm(ckpt, data, pixels, family_name, bits, s, timer)
    finally:
        Trainer.train = original
    free_memory(s.device)
    plain = {**timer.summary(), "settings": settings}
    plain.update(mfu(plain_found, plain_shapes, plain, config, device_name))
    shutil.rmtree(ckpt, ignore_errors=True)
    return {
        "model": hub_id, "bits": bits, "image_side": s.perf_image_side, "batch_size": s.perf_batch,
        "vlmtune": ours, "plain": plain,
        "ratios_vlmtune_over_plain": {
            "tokens_per_s": ratio(ours.get("tokens_per_s"), plain.get("tokens_per_s")),
            "peak_allocated": ratio(peak_of(ours), peak_of(plain)),
        },
    }  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def mfu(found: dict, shapes: list[dict], trained: dict, config: dict, device_name: str) -> dict:
    """MFU of the median step (tokens and patches averaged over the timed steps' batches)."""
    params = found.get("linear_params")
    timed = shapes[1 : trained["steps"]] or shapes[:1]
    if not params or not timed or not trained.get("median_step_s"):
        return {"mfu": None, "flops_per_step": None}
    text, vision = config.get("text_config", config), config.get("vision_config", {})
    per_batch = [
        step_flops(
            params["language"], params["vision"] + params["projector"], params["lm_head"],
            sum(b["lengths"]), sum(b["patches"]), b["labelled"], b["lengths"], b["patches"],
            text["num_hidden_layers"], text["hidden_size"],
            vision.get("depth", vision.get("num_hidden_layers", 0)), vision.get("embed_dim", vision.get("hidden_size", 0)),
            checkpointing=True,
        )
        for b in timed
    ]  # fmt: skip
    flops = statistics.mean(per_batch)
    peak = peak_flops(device_name)
    achieved = flops / trained["median_step_s"]
    return {
        "flops_per_step": flops,
        "achieved_tflops": achieved / 1e12,
        "peak_tflops": peak / 1e12 if peak else None,
        "mfu": achieved / peak if peak else None,
        "linear_params": params,
        "tokens_per_step_mean": statistics.mean(sum(b["lengths"]) for b in timed),
    }


def part_workloads(s: Any, work: Path, emit: Callable[[dict], None], dry_7b: dict, device_name: str) -> dict:
    out: dict = {}
    for name in WORKLOADS:
        out[name] = workload(name, s, work, dry_7b, device_name)
        emit(out)
    return out


def part_offload(s: Any, work: Path, emit: Callable[[dict], None], dry_7b: dict, device_name: str) -> dict:
    import compare
    from harness import build_random_checkpoint

    hub_id, family_name, bits = WORKLOADS["qwen2_vl_2b_bf16_lora"]
    ckpt = work / "checkpoint"
    build_random_checkpoint(perf_shape(hub_id, s, dry_7b), family_name, ckpt, s.device)
    data = compare.build_data(work / "data", s.perf_image_side, n=s.perf_batch * s.perf_steps, widths=WIDTHS)
    out: dict = {"model": hub_id, "image_side": s.perf_image_side, "batch_size": s.perf_batch}
    for offload in (False, True):
        key = "offload_on" if offload else "offload_off"
        recipe = write_recipe(work / key / "recipe.yaml", str(ckpt), data, workload_pixels(s.perf_image_side),
                              bits, s, offload_activations=offload)  # fmt: skip
        out[key] = train_measured(recipe, work / key / "run", s.device, [], [])
        emit(out)
    off, on = out["offload_off"], out["offload_on"]
    out["step_time_ratio_on_over_off"] = on["median_step_s"] / off["median_step_s"]
    out["peak_ratio_on_over_off"] = peak_of(on) / peak_of(off) if peak_of(off) else None
    return out


def peak_of(trained: dict) -> float:
    """max_memory_allocated on CUDA, the RSS high-water mark on CPU (harness.peak_bytes); 0 when missing."""
    from harness import peak_bytes

    peak = trained.get("training_peak") or {}
    return float(peak_bytes(peak)) if peak else 0.0


# --- kernel micro-benchmarks --------------------------------------------------------------------------


def kernel_cases(s: Any) -> dict[str, Callable[[], tuple[Callable, Callable, tuple]]]:
    """name -> a builder of (kernel fn, torch fn, inputs); shapes of a 7B layer on GPU, tiny in a dry run."""
    import torch

    device, dtype = s.device, (torch.bfloat16 if s.device == "cuda" else torch.float32)
    tokens, hidden, inter, heads, kv, head_dim = s.kernel_shape

    def tensor(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_(True)

    def rmsnorm():
        from vlmtune.kernels.rmsnorm import rms_norm, rms_norm_reference

        return (lambda x, w: rms_norm(x, w, 1e-6), lambda x, w: rms_norm_reference(x, w, 1e-6),
                (tensor(tokens, hidden), tensor(hidden)))  # fmt: skip

    def glu(activation):
        def build():
            from vlmtune.kernels.glu import glu as kernel
            from vlmtune.kernels.glu import glu_reference

            return (lambda g, u: kernel(g, u, activation), lambda g, u: glu_reference(g, u, activation),
                    (tensor(tokens, inter), tensor(tokens, inter)))  # fmt: skip

        return build

    def rope():
        from vlmtune.kernels.rope import apply_rotary, rotary_reference

        angles = torch.randn(1, tokens, head_dim // 2, device=device)
        cos = torch.cat((angles, angles), -1).cos().to(dtype)
        sin = torch.cat((angles, angles), -1).sin().to(dtype)
        return (lambda q, k: apply_rotary(q, k, cos, sin),
                lambda q, k: (rotary_reference(q, cos, sin), rotary_reference(k, cos, sin)),
                (tensor(1, heads, tokens, head_dim), tensor(1, kv, tokens, head_dim)))  # fmt: skip

    def nf4_lora():
        import bitsandbytes.functional as bnbf

        from vlmtune.kernels.nf4_lora import nf4_lora as kernel
        from vlmtune.kernels.nf4_lora import nf4_weight

        w = torch.randn(inter, hidden, device=device, dtype=dtype) * 0.02
        packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        weight = nf4_weight(packed, state)

        def reference(x, a, b):  # what peft + bitsandbytes do: dequantize whole, matmul, LoRA beside
            return x @ bnbf.dequantize_4bit(packed, state).to(dtype).t() + 2.0 * (x @ a.t()) @ b.t()

        return (lambda x, a, b: kernel(x, weight, a, b, 2.0), reference,
                (tensor(tokens, hidden), tensor(16, hidden, scale=0.01), tensor(inter, 16, scale=0.01)))  # fmt: skip

    return {
        "rmsnorm": rmsnorm,
        "swiglu": glu("swiglu"),
        "geglu": glu("geglu"),
        "rope": rope,
        "nf4_lora": nf4_lora,
    }


def time_fwd_bwd(fn: Callable, inputs: tuple, reps: int, device: str) -> tuple[float, list]:
    """Median ms of forward + backward of sum(outputs * g) and the last outputs and gradients."""
    import torch

    seconds = []
    result: list = []
    for _ in range(reps):
        for t in inputs:
            t.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = fn(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        sum((o.float() * 0.5).sum() for o in outs).backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        result = [o.detach() for o in outs] + [t.grad for t in inputs]
    return statistics.median(seconds[1:] or seconds) * 1000, result


def part_kernels(s: Any, work: Path, emit: Callable[[dict], None], dry_7b: dict, device_name: str) -> dict:
    if s.device != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules load; the figures mean nothing
    out: dict = {"shape": dict(zip(("tokens", "hidden", "intermediate", "heads", "kv_heads", "head_dim"),
                                   s.kernel_shape, strict=True)), "kernels": {}}  # fmt: skip
    for name, build in kernel_cases(s).items():
        kernel_fn, torch_fn, inputs = build()
        rows = []
        for _ in range(s.kernel_rounds):  # interleaved: noise hits both
            kernel_ms, kernel_out = time_fwd_bwd(kernel_fn, inputs, s.kernel_reps, s.device)
            torch_ms, torch_out = time_fwd_bwd(torch_fn, inputs, s.kernel_reps, s.device)
            rows.append((kernel_ms, torch_ms))
        pairs = list(zip(kernel_out, torch_out, strict=True))
        error = max(float((a.float() - b.float()).abs().max()) for a, b in pairs)
        # relative to each tensor's largest value: bf16 keeps 8 bits of mantissa, sums differ in order
        relative = max(
            float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))
            for a, b in pairs
        )
        kernel_ms = statistics.median(r[0] for r in rows)
        torch_ms = statistics.median(r[1] for r in rows)
        out["kernels"][name] = {"kernel_ms": kernel_ms, "torch_ms": torch_ms, "speedup": torch_ms / kernel_ms,
                                "max_abs_error": error, "max_relative_error": relative,
                                "agrees": relative <= AGREEMENT}  # fmt: skip
        emit(out)
    # vlmtune/kernels/patching.py's names: swiglu and geglu share the `glu` kernel (the slower decides);
    # a kernel whose results disagree with torch's counts as never faster
    speedups = {k: v["speedup"] if v["agrees"] else 0.0 for k, v in out["kernels"].items()}
    by_kernel = {"rmsnorm": speedups["rmsnorm"], "glu": min(speedups["swiglu"], speedups["geglu"]),
                 "rope": speedups["rope"], "nf4_lora": speedups["nf4_lora"]}  # fmt: skip
    out["measured_faster"] = {k: round(v, 3) for k, v in by_kernel.items()} if s.device == "cuda" else {}
    return out


def dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str))
