#!/usr/bin/env python3
"""The GPU benchmark: vlmtune's central claims (4-bit on CUDA, peak memory, tokens/s against the
plain stack, the memory estimate) measured in one launch of at most 8 minutes on one H100/H200.

    bash bench/gpu.sh                 # on the GPU machine: installs .whl/ into .site, then runs this
    python bench/gpu.py --dry-run     # CPU, tiny shapes, the same code paths: ~2.5 min on 2 cores
    python bench/gpu.py --deadline 450 --out results.json

The device command (the device tool runs it in the repo root; .whl/ comes from
../shared/gpu/fetch-wheels.sh and travels with carry):

    bash bench/gpu.sh                 carry [".whl"], timeout_s 570

Every model has random weights at real shapes from the bundled configs (vlmtune/model/configs/*.json) and
the tiny family's tokenizer and processor files, with the vocabulary at its real size. Parts, each
in its own subprocess with a timeout (a part that fails or hangs records that and the rest go on),
under one global deadline:

  env                   versions, the device, one 4-bit Linear forward/backward
  compare               bench/compare.py's two arms at Qwen2-VL-2B shape: vlmtune vs the plain stack
                        (tokens/s, peak memory, the loss at step 1)
  memory_qwen2_5_vl_7b  QLoRA r16 on both towers, batch 2, 448x448 images, a few steps of
  memory_mllama_11b     `vlmtune train`: measured peak against `vlmtune estimate-memory --json`
                        for the same recipe, image size and tokens
  tiny_families         `vlmtune train tiny:FAMILY` for every family, 4-bit + LoRA, 2 steps
  torch_compile         train.torch_compile off and on, step times
  packing               train.packing against unpacked (length-grouped) vlmtune at the same bound on
                        tokens per forward (16,384 on GPU), Qwen2-VL-2B and Qwen2.5-VL-7B shapes, a mixed
                        dataset (bench/packing.py's: answers of 5-400 tokens, 0-2 images of several sizes):
                        real tokens/s, peak memory and MFU (docs/benchmarks.md gives the formula)
  workloads, kernels,   issue 26's performance parts (bench/gpu_perf.py): realistic workloads with MFU and a
  offload               profiler breakdown, the Triton kernels against torch, activation offloading. Not
                        in the default launch (its 8 minutes are spent): `--parts workloads kernels offload`
  resume                tiny:qwen2_vl 4-bit + LoRA in bf16, 6 steps uninterrupted, and the same run
                        stopped by SIGTERM (saved at step 3) then resumed: the resume tolerance below

The memory parts and tiny_families run side by side (peaks are per process, and their speed is not
a goal; their real-size checkpoints take turns on the disk, each deleted once loaded); compare and
torch_compile run alone. Peak memory is torch.cuda.max_memory_allocated (and
max_memory_reserved) on CUDA; on CPU it is the process's RSS high-water mark, labelled `rss_hwm`.

Goals, printed as pass/fail beside the figures:
  - vlmtune >= 1.5x the plain stack's tokens/s, and <= 0.6x its peak (max_memory_allocated);
  - the estimate within 10% of max_memory_allocated during training (the estimate minus its
    CUDA-context constant, which the allocator does not see);
  - the 7B run's peak within 1.25x of the 6.5-7.5 GB Unsloth's notebooks log for that model
    (they print max_memory_reserved in GiB): at most 1.25 x 7.5 GiB reserved;
  - the GPU resume tolerance (docs/reliability.md): the first step after the resume within 1e-6 of
    the uninterrupted run's loss, every later step within the bf16 envelope (1e-2 x max(1, |loss|)).
    On CPU (the dry run) the resume is exact, so the same check holds with room to spare.
In a dry run the same goals are computed from CPU figures and mean nothing; the run checks the code.

Results: one JSON (bench/results/gpu-<date>.json; a dry run's goes under .cache/) and a table;
the parts' logs, combined, beside it (<name>.log). First measured on an H200 on 2026-11-30
(docs/benchmarks.md; bench/results/gpu-2026-11-30-h200.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

QWEN_7B = "Qwen/Qwen2.5-VL-7B-Instruct"
MLLAMA_11B = "meta-llama/Llama-3.2-11B-Vision-Instruct"
MEMORY_PARTS = {"memory_qwen2_5_vl_7b": (QWEN_7B, "qwen2_5_vl"), "memory_mllama_11b": (MLLAMA_11B, "mllama")}
# Parts in one list run side by side; the lists run in order (timing-sensitive parts alone).
SCHEDULE = [["env"], ["compare"], [*MEMORY_PARTS, "tiny_families", "resume"], ["torch_compile"], ["packing"]]
PACKING_MODELS = ("Qwen/Qwen2-VL-2B-Instruct", QWEN_7B)
PACKED_OVER_UNPACKED = (
    2.0  # goal: real tokens/s of packed over unpacked vlmtune, same tokens-per-forward bound
)
# Dense bf16 peak FLOP/s (no sparsity) by device name, for MFU: NVIDIA's datasheets (SXM parts).
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
MIN_PART_SECONDS = 30  # a part is not started with less time than this before the deadline

# Goals (see the docstring).
TOKENS_PER_S_RATIO = 1.5
PEAK_RATIO = 0.6
ESTIMATE_TOLERANCE = 0.10
UNSLOTH_7B_GIB = (6.5, 7.5)
UNSLOTH_FACTOR = 1.25
RESUME_FIRST_STEP = 1e-6  # |loss delta| at the first step after the resume (the restored state is the same)
RESUME_BF16_ENVELOPE = 1e-2  # later steps: |delta| <= this x max(1, |loss|) (bf16: 8 mantissa bits)
RESUME_STEPS, RESUME_STOP_AT = 6, 2  # SIGTERM as step 3 begins: step 3 finishes and is saved

# Dry-run shapes laid over the real configs: 2 layers, narrow, the real vocabulary; every
# structural rule still holds (mrope sections sum to head_dim / 2, Mllama's cross-attention layer and
# intermediate vision layers exist, its vision output is hidden x (intermediate layers + 1)).
DRY_SHAPES = {
    QWEN_7B: {
        "text_config": {
            "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 6, 6]},
        },
        "vision_config": {"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2,
                          "out_hidden_size": 128, "fullatt_block_indexes": [1]},
    },
    MLLAMA_11B: {
        "text_config": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
                        "num_attention_heads": 4, "num_key_value_heads": 2, "cross_attention_layers": [1]},
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_global_layers": 1, "attention_heads": 2, "image_size": 56,
                          "intermediate_layers_indices": [0, 1], "vision_output_dim": 192},
    },
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    """What differs between the GPU run and the dry run: device, shapes, steps, time."""

    device: str
    deadline_s: int
    compare_args: tuple[str, ...]
    shrink: bool  # lay DRY_SHAPES over the real configs
    image_side: int  # square images of the memory and compile parts
    max_length: int
    memory_steps: int
    tiny_steps: int
    compile_shape: tuple[int, int]  # hidden, layers of a Qwen2-VL-shaped model (compare.py's knobs)
    compile_steps: int
    packing_budget: int = 16_384  # tokens per packed row; the unpacked arm's batch_size x max_length
    packing_max_length: int = 1_024
    packing_steps: int = 6
    # tiny_families: None = every family. The dry run proves the part on two (tests/test_family_training.py
    # already trains every family two QLoRA steps on CPU); the GPU run is where each family's CUDA path shows.
    tiny_families: tuple[str, ...] | None = None
    # The dry run packs on the 7B shape alone (its window attention and mrope are the 2B's and more).
    packing_models: tuple[str, ...] = PACKING_MODELS
    timeouts: dict[str, int] = field(default_factory=dict)


GPU = Settings(
    device="cuda",
    deadline_s=450,
    compare_args=("--config", "Qwen/Qwen2-VL-2B-Instruct", "--rounds", "1", "--steps", "10", "--image-side", "448"),
    shrink=False,
    image_side=448,  # 256 image tokens in Qwen2.5-VL; one 560 px tile in Mllama
    max_length=2048,  # Unsloth's notebooks' max_seq_length
    memory_steps=3,
    tiny_steps=2,
    compile_shape=(512, 2),
    compile_steps=8,
    timeouts={"env": 60, "compare": 200, "memory_qwen2_5_vl_7b": 240, "memory_mllama_11b": 270,
              "tiny_families": 200, "torch_compile": 150, "packing": 420, "resume": 200},
)  # fmt: skip
DRY = Settings(
    device="cpu",
    deadline_s=1100,
    compare_args=("--hidden", "128", "--layers", "2", "--rounds", "1", "--steps", "3", "--image-side", "112"),
    shrink=True,
    image_side=112,
    max_length=512,
    memory_steps=2,
    tiny_steps=2,
    compile_shape=(128, 2),
    compile_steps=3,
    packing_budget=1_024,
    packing_max_length=512,
    packing_steps=2,
    tiny_families=("qwen2_vl", "mllama"),
    packing_models=(QWEN_7B,),
    timeouts={"env": 120, "compare": 300, "memory_qwen2_5_vl_7b": 300, "memory_mllama_11b": 300,
              "tiny_families": 400, "torch_compile": 400, "packing": 400, "resume": 400},
)  # fmt: skip


# --- parts (each runs inside its own subprocess) --------------------------------------------------

Emit = Callable[[dict], None]


def part_env(s: Settings, work: Path, emit: Emit) -> dict:
    """Versions, the device, and one 4-bit Linear forward/backward on it (bitsandbytes' kernels)."""
    from importlib.metadata import PackageNotFoundError, version

    packages, errors = {}, {}
    for name in (
        "torch",
        "transformers",
        "trl",
        "peft",
        "bitsandbytes",
        "datasets",
        "accelerate",
        "pydantic",
    ):
        try:
            packages[name] = version(name)
            __import__(name)
        except (PackageNotFoundError, ImportError) as exc:
            errors[name] = str(exc).splitlines()[0]
    import torch

    out = {"python": sys.version.split()[0], "packages": packages, "import_errors": errors}
    out["device"] = {"kind": s.device, "name": device_name(s.device)}
    if s.device == "cuda":
        out["device"]["total_memory"] = torch.cuda.get_device_properties(0).total_memory
    out["nf4_linear_grad_norm"] = nf4_linear_check(s.device)
    if errors:
        raise RuntimeError(f"imports failed: {errors}")
    return out


def device_name(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()


def nf4_linear_check(device: str) -> float:
    """A 4-bit NF4 Linear (as vlmtune quantizes) forward and backward; the input's gradient norm."""
    import bitsandbytes as bnb
    import torch

    torch.manual_seed(0)
    dense = torch.nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(256, 128, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data, requires_grad=False, quant_type="nf4")
    layer = layer.to(device)
    x = torch.randn(4, 256, dtype=torch.bfloat16, device=device, requires_grad=True)
    layer(x).float().pow(2).mean().backward()
    norm = float(x.grad.float().norm())
    if not math.isfinite(norm) or norm == 0.0:
        raise RuntimeError(f"a 4-bit Linear gave no usable gradient on {device} (norm {norm})")
    return norm


def part_compare(s: Settings, work: Path, emit: Emit) -> dict:
    import compare

    args = compare.parse_args(
        [*s.compare_args, "--device", s.device, "--work", str(work), "--out", str(work / "compare.json")]
    )
    result = compare.run(args)
    shutil.rmtree(work / compare.checkpoint_name(args))  # 4.4 GB at the 2B shape: room for the next parts
    return result


def part_memory(hub_id: str, family: str) -> Callable[[Settings, Path, Emit], dict]:
    def run(s: Settings, work: Path, emit: Emit) -> dict:
        return measure_memory(s, work, hub_id, family)

    return run


def measure_memory(s: Settings, work: Path, hub_id: str, family: str) -> dict:
    """Train a random QLoRA model at real shapes a few steps; its peak against estimate-memory's."""
    import compare
    from harness import DiskTurn, build_random_checkpoint, bundled_config, drop_weights, merged

    shape = merged(bundled_config(hub_id), DRY_SHAPES[hub_id]) if s.shrink else bundled_config(hub_id)
    ckpt = work / "checkpoint"
    data = compare.build_data(work / "data", s.image_side, n=8, widths=(1.0,))
    recipe = write_recipe(
        work / "recipe.yaml", str(ckpt), data, s.image_side**2, s.max_length, s.memory_steps, s.device
    )
    turn = DiskTurn(work.parent / "checkpoint-disk.lock")
    try:
        started = time.perf_counter()
        build_random_checkpoint(shape, family, ckpt, s.device)
        built_s = time.perf_counter() - started
        trained = train(
            recipe, work / "run", s.device, at_train_begin=(lambda: drop_weights(ckpt), turn.release)
        )
    finally:
        turn.release()
    tokens = read_tokens(work / "run")
    estimate = estimate_memory(recipe, s.image_side, tokens["max"])
    shutil.rmtree(ckpt)
    return {
        "model": hub_id,
        "shape": "real" if not s.shrink else "dry-run (DRY_SHAPES laid over the real config)",
        "build_seconds": built_s,
        "settings": {"batch_size": 2, "max_length": s.max_length, "image_size": f"{s.image_side}x{s.image_side}",
                     "lora_r": 16, "steps": s.memory_steps, "tokens_per_sample": tokens},
        "measured": trained,
        "estimate": estimate,
        "estimate_vs_measured": estimate_ratio(estimate, trained),
    }  # fmt: skip


def write_recipe(
    path: Path,
    model: str,
    data: Path,
    pixels: int,
    max_length: int,
    steps: int,
    device: str,
    torch_compile: bool = False,
) -> Path:
    """QLoRA r16 on both towers (the schema's defaults), batch 2, one batch per optimizer step."""
    import yaml

    recipe = {
        "model": {"name": model},
        "lora": {"r": 16, "alpha": 16},
        "data": {"train": str(data), "max_image_pixels": pixels, "shuffle": False},
        "train": {
            "max_steps": steps, "batch_size": 2, "grad_accum": 1, "lr": 1e-4, "max_length": max_length,
            "logging_steps": 1, "save_steps": 100_000, "group_by_length": False, "gradient_checkpointing": True,
            "torch_compile": torch_compile, "device": device,
        },
        "output": {"dir": str(path.parent)},
    }  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def train(
    recipe: Path, run_dir: Path, device: str, at_train_begin: tuple[Callable[[], None], ...] = ()
) -> dict:
    """`vlmtune train RECIPE` in this process, measured by the probe."""
    from harness import StepTimer, free_memory, reset_peak, run_vlmtune

    timer = StepTimer(device)
    timer.at_train_begin.extend(at_train_begin)
    # What ran before in this process (a checkpoint build, another family) is freed: the run's
    # peak starts here, as in a fresh process.
    reset_peak(device)
    started = time.perf_counter()
    with timer.watching():
        run_vlmtune(["train", str(recipe), "--run-dir", str(run_dir)])
    free_memory(device)
    return {**timer.summary(), "seconds": time.perf_counter() - started}


def read_tokens(run_dir: Path) -> dict:
    """Tokens per sample (image tokens included) as the run's data pre-flight counted them."""
    report = json.loads((run_dir / "3-train" / "data_report.json").read_text())
    return report["train"]["tokens"]


def estimate_memory(recipe: Path, side: int, tokens_per_sample: int) -> dict:
    """`vlmtune estimate-memory RECIPE --json` for the run's workload: its image size and its tokens.

    The estimator adds the image tokens to --seq-len, so a first call at --seq-len 0 tells how many
    it counts for this image size; the second asks for the rest of the sample as text.
    """
    probe = estimate_json([str(recipe), "--image-size", f"{side}x{side}", "--seq-len", "0"])
    image_tokens = probe["inputs"]["image_tokens"] * probe["inputs"]["images_per_sample"]
    seq_len = max(0, tokens_per_sample - image_tokens)
    return estimate_json([str(recipe), "--image-size", f"{side}x{side}", "--seq-len", str(seq_len)])


def estimate_json(args: list[str]) -> dict:
    from harness import run_vlmtune

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_vlmtune(["estimate-memory", *args, "--json"])
    return json.loads(printed.getvalue())


def estimate_ratio(estimate: dict, trained: dict) -> dict:
    """The estimate against the training phase's peak; CUDA's allocator never sees the CUDA context."""
    from harness import peak_bytes

    predicted = estimate["peak_bytes"] - estimate["terms"]["overhead"]
    measured = peak_bytes(trained["training_peak"])
    return {
        "predicted_bytes": predicted,
        "predicted_with_context_bytes": estimate["peak_bytes"],
        "measured_bytes": measured,
        "measured_kind": trained["training_peak"]["kind"],
        "ratio": predicted / measured,
    }


def part_tiny_families(s: Settings, work: Path, emit: Emit) -> dict:
    """`vlmtune train` on tiny:FAMILY for every family (the settings' subset in a dry run), one after another;
    each family's outcome is kept."""
    from vlmtune.model.families import family_names

    data = ROOT / "data" / "demo" / "train.jsonl"
    families: dict[str, dict] = {}
    for name in s.tiny_families or family_names():
        recipe = write_recipe(
            work / name / "recipe.yaml", f"tiny:{name}", data, 12544, 1024, s.tiny_steps, s.device
        )
        try:
            families[name] = {"status": "ok", **train(recipe, work / name / "run", s.device)}
        except Exception as exc:  # one family's failure must not hide the others'
            traceback.print_exc()  # the whole story goes to the log; the results keep its first line
            families[name] = {"status": "failed", "error": first_line(exc)}
        emit({"families": families})
    failed = [n for n, r in families.items() if r["status"] != "ok" or not trained_ok(r, s.tiny_steps)]
    if failed:
        raise PartError(f"families that did not train {s.tiny_steps} steps with finite losses: {failed}",
                        {"families": families})  # fmt: skip
    return {"families": families}


def trained_ok(result: dict, steps: int) -> bool:
    losses = result.get("losses", [])
    return result.get("steps") == steps and len(losses) == steps and all(math.isfinite(x) for x in losses)


def part_torch_compile(s: Settings, work: Path, emit: Emit) -> dict:
    """Step times with train.torch_compile off, then on, on a small Qwen2-VL shape and fixed-size images."""
    import compare
    from harness import build_random_checkpoint

    hidden, layers = s.compile_shape
    ckpt = work / "checkpoint"
    build_random_checkpoint(compare.qwen2_vl_shape(hidden, layers, 151_936), "qwen2_vl", ckpt, s.device)
    data = compare.build_data(work / "data", s.image_side, n=2 * s.compile_steps, widths=(1.0,))
    out: dict = {"shape": {"hidden": hidden, "layers": layers, "vocab": 151_936}, "image_side": s.image_side}
    for compiled in (False, True):
        key = "compile_on" if compiled else "compile_off"
        recipe = write_recipe(work / key / "recipe.yaml", str(ckpt), data, s.image_side**2, s.max_length,
                              s.compile_steps, s.device, torch_compile=compiled)  # fmt: skip
        try:
            out[key] = compile_figures(train(recipe, work / key / "run", s.device))
        except Exception as exc:  # compiling may fail where the eager run works: keep the eager figures
            traceback.print_exc()
            out[key] = {"status": "failed", "error": first_line(exc)}
        emit(out)
    failed = [k for k in ("compile_off", "compile_on") if out[k].get("status") == "failed"]
    if failed:
        raise PartError(f"{failed}: {[out[k]['error'] for k in failed]}", out)
    out["steady_step_ratio_on_over_off"] = (
        out["compile_on"]["steady_step_s"] / out["compile_off"]["steady_step_s"]
    )
    return out


def compile_figures(trained: dict) -> dict:
    """First step (where compilation happens) apart from the steady steps after two warm-up steps."""
    seconds = trained["step_seconds"]
    steady = seconds[2:] or seconds[-1:]
    return {
        "status": "ok",
        "first_step_s": seconds[0] if seconds else None,
        "steady_step_s": sorted(steady)[len(steady) // 2] if steady else None,
        **trained,
    }


def part_packing(s: Settings, work: Path, emit: Emit) -> dict:
    """Packed against unpacked vlmtune on each of the settings' packing_models shapes: real tokens/s, peak, MFU."""
    import compare
    import packing
    from harness import build_random_checkpoint, bundled_config, merged

    data = packing.build_data(work / "data", n=64 if s.shrink else 640)
    out: dict = {"budget": s.packing_budget, "max_length": s.packing_max_length, "models": {},
                 "attn_implementation": attention_for_packing(s.device)}  # fmt: skip
    for hub_id in s.packing_models:
        family = bundled_config(hub_id)["model_type"]
        if not s.shrink:
            shape = bundled_config(hub_id)
        elif hub_id in DRY_SHAPES:
            shape = merged(bundled_config(hub_id), DRY_SHAPES[hub_id])
        else:
            shape = compare.qwen2_vl_shape(128, 2, 151_936)
        ckpt = work / "checkpoint"
        build_random_checkpoint(shape, family, ckpt, s.device)
        figures: dict = {"shape": "real" if not s.shrink else "dry-run", "params_6n": flops_params(shape)}
        for arm in ("unpacked", "packed"):
            recipe = packing_recipe(work / arm / "recipe.yaml", ckpt, data, s, packed=arm == "packed")
            trained = train(recipe, work / f"{hub_id.split('/')[1]}-{arm}" / "run", s.device)
            figures[arm] = {
                **trained,
                "mfu": mfu(trained.get("tokens_per_s"), figures["params_6n"], s.device),
            }
            emit({**out, "models": {**out["models"], hub_id: figures}})
        unpacked, packed = figures["unpacked"].get("tokens_per_s"), figures["packed"].get("tokens_per_s")
        figures["packed_over_unpacked"] = packed / unpacked if packed and unpacked else None
        out["models"][hub_id] = figures
        shutil.rmtree(ckpt)
    return out


def packing_recipe(path: Path, ckpt: Path, data: Path, s: Settings, packed: bool) -> Path:
    """QLoRA r16, one batch a step; both arms bound a forward at packing_budget tokens."""
    import yaml

    arm = (
        {"packing": True, "max_tokens_per_batch": s.packing_budget, "batch_size": 1}
        if packed
        else {"group_by_length": True, "batch_size": s.packing_budget // s.packing_max_length}
    )
    recipe = {
        "model": {"name": str(ckpt), "attn_implementation": attention_for_packing(s.device)},
        "lora": {"r": 16, "alpha": 16},
        "data": {"train": str(data), "max_image_pixels": 448 * 336, "shuffle": True},
        "train": {"max_steps": s.packing_steps, "grad_accum": 1, "lr": 1e-4, "max_length": s.packing_max_length,
                  "logging_steps": 1, "save_steps": 100_000, "gradient_checkpointing": True, "device": s.device,
                  **arm},
    }  # fmt: skip
    recipe["data"]["too_long"] = "drop"  # the mixed data's longest samples may pass a dry run's max_length
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def attention_for_packing(device: str) -> str:
    """The recipe's attention for both arms: flash_attention_2 where installed (variable-length: a packed
    row's samples cost their own attention); else sdpa, which vlmtune switches to per-sample sdpa in the
    packed arm's language model (vlmtune.training.packed_attention; each arm's ``language_attention``
    records what ran)."""
    import importlib.util

    return "flash_attention_2" if device == "cuda" and importlib.util.find_spec("flash_attn") else "sdpa"


def flops_params(config: dict) -> int:
    """N of MFU's 6N: the language model's matmul weights (attention, MLP) and lm_head; no embeddings,
    norms or vision tower (docs/benchmarks.md)."""
    text = config.get("text_config", config)
    h, layers, inter = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]
    heads, kv = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
    head_dim = text.get("head_dim") or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2  # q, o; k, v
    return layers * (attention + 3 * h * inter) + h * text["vocab_size"]


def mfu(tokens_per_s: float | None, params: int, device: str) -> float | None:
    """Model FLOPs utilisation: 6N FLOPs a real token over the device's dense bf16 peak (None on CPU)."""
    if not tokens_per_s or device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    return None if peak is None else 6 * params * tokens_per_s / peak


def part_resume(s: Settings, work: Path, emit: Emit) -> dict:
    """The same QLoRA run uninterrupted, and stopped by SIGTERM then resumed (`vlmtune train --resume`),
    each in its own process as a user runs them; their losses compared under the resume tolerance."""
    import yaml

    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "tiny:qwen2_vl", "dtype": "bfloat16"},
        "quantization": {"bits": 4},
        "lora": {"dropout": 0.1},  # the RNG state matters
        "data": {"train": str(ROOT / "data/demo/train.jsonl"), "max_image_pixels": 12544, "max_samples": 16},
        "train": {"max_steps": RESUME_STEPS, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 2,
                  "max_length": 256, "gradient_checkpointing": False, "save_steps": 100_000,
                  "logging_steps": 1, "device": s.device},
    }, sort_keys=False))  # fmt: skip
    whole, stopped = work / "whole", work / "stopped"
    cli = [sys.executable, "-m", "vlmtune", "train"]
    faults = [
        sys.executable,
        str(ROOT / "tests" / "faults.py"),
        f"SIGTERM@step:{RESUME_STOP_AT}",
        "--",
        "train",
    ]
    for name, command in (
        ("whole", [*cli, str(recipe), "--run-dir", str(whole)]),
        ("stopped", [*faults, str(recipe), "--run-dir", str(stopped)]),
        ("resumed", [*cli, "--resume", str(stopped)]),
    ):
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=s.timeouts["resume"])
        print(f"--- {name}: exit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}", flush=True)
        expected = 128 + signal.SIGTERM if name == "stopped" else 0
        if done.returncode != expected:
            raise PartError(f"{name} exited {done.returncode}, not {expected}", {})
    summary = json.loads((stopped / "summary.json").read_text())
    saved = summary["resumes"][0]["from_step"]
    figures = {
        "saved_on_signal_at_step": saved,
        **resume_tolerance(losses_of(whole), losses_of(stopped), saved),
    }
    emit(figures)
    if not figures["resume_within_tolerance"]:
        raise PartError(f"the resumed run is outside the resume tolerance: {figures}", figures)
    return figures


def losses_of(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "3-train" / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def resume_tolerance(whole: dict[int, float], resumed: dict[int, float], from_step: int) -> dict:
    """The GPU resume contract: the first step after ``from_step`` within RESUME_FIRST_STEP (absolute),
    every later step within RESUME_BF16_ENVELOPE x max(1, |loss|), the same steps logged."""
    after = [step for step in sorted(whole) if step > from_step]
    if not after or sorted(resumed) != sorted(whole):
        return {"resume_steps_match": False, "resume_within_tolerance": False}
    first = abs(resumed[after[0]] - whole[after[0]])
    later = [abs(resumed[step] - whole[step]) / max(1.0, abs(whole[step])) for step in after[1:]]
    return {
        "resume_steps_match": True,
        "resume_first_step": after[0],
        "resume_first_step_delta": first,
        "resume_max_rel_delta": max(later, default=0.0),
        "resume_within_tolerance": first <= RESUME_FIRST_STEP
        and all(d <= RESUME_BF16_ENVELOPE for d in later),
    }


PARTS: dict[str, Callable[[Settings, Path, Emit], dict]] = {
    "env": part_env,
    "compare": part_compare,
    **{name: part_memory(*model) for name, model in MEMORY_PARTS.items()},
    "tiny_families": part_tiny_families,
    "torch_compile": part_torch_compile,
    "packing": part_packing,
    "resume": part_resume,
}


# --- issue 26's performance parts (bench/gpu_perf.py), a launch of their own -----------------------------

PERF_PARTS = ("workloads", "kernels", "offload")
SCHEDULE.extend([[name] for name in PERF_PARTS])  # each alone: they time things
# On a GPU the workloads part alone needs most of a launch (a 7B checkpoint built, two arms of two
# workloads): run it as `BENCH_BUDGET_S=570 bash bench/gpu.sh --parts workloads`, then `--parts kernels offload`.
PERF_TIMEOUTS = {"cuda": {"workloads": 530, "kernels": 120, "offload": 240},
                 "cpu": {"workloads": 900, "kernels": 300, "offload": 400}}  # fmt: skip


@dataclass(frozen=True)
class PerfSettings:
    device: str
    shrink: bool
    perf_steps: int  # optimizer steps per workload run
    perf_batch: int
    perf_max_length: int
    perf_image_side: int  # compare.build_data: SIDE x SIDE and 1.5 SIDE x SIDE images
    perf_profile_from: int  # the profiled optimizer steps: [from, from + steps)
    perf_profile_steps: int
    kernel_shape: tuple[
        int, int, int, int, int, int
    ]  # tokens, hidden, intermediate, heads, kv heads, head_dim
    kernel_reps: int
    kernel_rounds: int


PERF = {
    # 896x896 and 1024x896 images: 1024 and 1152 image tokens per sample, 8 samples: ~9k tokens a step
    "cuda": PerfSettings("cuda", False, 5, 8, 2048, 896, 2, 2, (8192, 3584, 18944, 28, 4, 128), 10, 3),
    "cpu": PerfSettings("cpu", True, 2, 2, 512, 112, 1, 1, (32, 64, 128, 4, 2, 16), 2, 1),
}


def perf_part(name: str) -> Callable[[Settings, Path, Emit], dict]:
    def run(s: Settings, work: Path, emit: Emit) -> dict:
        import gpu_perf

        part = getattr(gpu_perf, f"part_{name}")
        return part(PERF[s.device], work, emit, DRY_SHAPES[QWEN_7B], device_name(s.device))

    return run


PARTS.update({name: perf_part(name) for name in PERF_PARTS})
GPU.timeouts.update(PERF_TIMEOUTS["cuda"])
DRY.timeouts.update(PERF_TIMEOUTS["cpu"])


class PartError(RuntimeError):
    """A part that ran but missed what it checks; ``figures`` are kept in the results."""

    def __init__(self, message: str, figures: dict):
        super().__init__(message)
        self.figures = figures


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:500]}" if text else type(exc).__name__


def run_part(name: str, s: Settings, work: Path, result: Path) -> int:
    """The child side: run one part, write its figures (also as it goes) to ``result``."""
    shutil.rmtree(
        work, ignore_errors=True
    )  # a second launch on a warm machine: vlmtune never reuses a run folder
    work.mkdir(parents=True)

    def emit(figures: dict) -> None:
        write_json(result, {"status": "running", **figures})

    try:
        figures = PARTS[name](s, work, emit)
    except Exception as exc:
        traceback.print_exc()
        partial = getattr(exc, "figures", None) or read_json(result) or {}
        write_json(result, {**partial, "status": "failed", "error": first_line(exc)})
        return 1
    write_json(result, {"status": "ok", **figures})
    return 0


# --- driver ---------------------------------------------------------------------------------------


def write_json(path: Path, data: dict) -> None:
    """Atomically, so the driver never reads half a file after a kill."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@dataclass
class Launched:
    name: str
    process: subprocess.Popen
    result: Path
    log: Path
    started: float
    ends_by: float


def child_env(dry_run: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")  # fmt: skip
    if dry_run:  # parts share the CPU; one thread each is steadier on a small shared machine (FACTS.md)
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def launch(name: str, args: argparse.Namespace, s: Settings, deadline: float, logs: Path) -> Launched:
    result, log = args.work / f"{name}.json", logs / f"{name}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--work", str(args.work / name),
           "--result", str(result), *(["--dry-run"] if args.dry_run else [])]  # fmt: skip
    now = time.monotonic()
    with log.open("w") as out:
        # A session of its own: a timeout kills the part and every process it started (compare's arms).
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(args.dry_run),
                                   start_new_session=True, cwd=ROOT)  # fmt: skip
    print(f"[{now - START:6.0f} s] {name} started", flush=True)
    return Launched(name, process, result, log, now, min(now + s.timeouts[name], deadline))


def finish(part: Launched) -> dict:
    """Wait for a part until its time is up; whatever it wrote is kept, with how it ended."""
    try:
        code = part.process.wait(timeout=max(0.0, part.ends_by - time.monotonic()))
        status = None if code == 0 else "failed"
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(part.process.pid, signal.SIGKILL)
        part.process.wait()
        status = "timeout"
    figures = read_json(part.result) or {}
    if status is not None:
        figures["status"] = status
        figures.setdefault("error", "timed out" if status == "timeout" else "no result written")
        figures["log_tail"] = log_tail(part.log)
    figures.update(seconds=round(time.monotonic() - part.started, 1), log=str(part.log))
    print(f"[{time.monotonic() - START:6.0f} s] {part.name}: {figures['status']} in {figures['seconds']} s"
          + (f" ({figures.get('error')})" if figures["status"] != "ok" else ""), flush=True)  # fmt: skip
    return figures


def log_tail(log: Path, lines: int = 25) -> list[str]:
    try:
        return log.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def drive(args: argparse.Namespace, s: Settings) -> dict:
    deadline = START + args.deadline
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    parts: dict[str, dict] = {}
    for group in SCHEDULE:
        chosen = [n for n in group if n in args.parts]
        if deadline - time.monotonic() < MIN_PART_SECONDS:
            parts.update({n: {"status": "skipped", "error": "global deadline reached"} for n in chosen})
            continue
        launched = [launch(n, args, s, deadline, logs) for n in chosen]
        parts.update({p.name: finish(p) for p in launched})
    results = {
        "date": str(date.today()),
        "mode": "dry-run" if args.dry_run else "gpu",
        "device": s.device,
        "peak_kind": "cuda max_memory_allocated"
        if s.device == "cuda"
        else "rss_hwm (CPU RSS high-water mark)",
        "command": " ".join(sys.argv),
        "deadline_s": args.deadline,
        "elapsed_s": round(time.monotonic() - START, 1),
        "parts": parts,
    }
    results["goals"] = goals(parts, args.dry_run)
    write_json(args.out, results)
    combine_logs(logs, args.out.with_suffix(".log"), parts)
    return results


def combine_logs(logs: Path, out: Path, parts: dict[str, dict], lines: int = 400) -> None:
    """One file for all parts' logs (their ends): the device tool brings back at most 8 files."""
    with out.open("w") as combined:
        for name in parts:
            combined.write(f"===== {name}: {parts[name]['status']} =====\n")
            combined.write("\n".join(log_tail(logs / f"{name}.log", lines)) + "\n")


# --- goals and the table ----------------------------------------------------------------------------


def goal(name: str, measured: float | None, target: str, passed: bool | None) -> dict:
    return {"goal": name, "measured": measured, "target": target, "pass": passed}


def goals(parts: dict[str, dict], dry_run: bool) -> list[dict]:
    """Each goal from the figures of its part; pass is None where the part has no figure to judge."""
    rows = [
        *compare_goals(parts.get("compare", {})),
        *estimate_goals(parts),
        unsloth_goal(parts),
        tiny_goal(parts),
        *packing_goals(parts.get("packing", {})),
        resume_goal(parts),
    ]
    for row in rows:
        row["note"] = "dry run: CPU figures, not the goal's measure" if dry_run else ""
    return rows


def judged(value: float | None, test: Callable[[float], bool]) -> bool | None:
    return None if value is None else test(value)


def compare_goals(cmp: dict) -> list[dict]:
    tokens = cmp.get("ratios_A_over_B", {}).get("tokens_per_s")
    peak = cmp.get("peak_ratio")
    return [
        goal("vlmtune tokens/s over plain", tokens, f">= {TOKENS_PER_S_RATIO}",
             judged(tokens, lambda v: v >= TOKENS_PER_S_RATIO)),
        goal("vlmtune peak over plain", peak, f"<= {PEAK_RATIO}", judged(peak, lambda v: v <= PEAK_RATIO)),
        goal("same loss at step 1 (compare)", None, "within 2%", cmp.get("same_loss_at_step_1")),
    ]  # fmt: skip


def estimate_goals(parts: dict[str, dict]) -> list[dict]:
    rows = []
    for name, (hub_id, _) in MEMORY_PARTS.items():
        ratio = parts.get(name, {}).get("estimate_vs_measured", {}).get("ratio")
        label = hub_id.split("/")[1].removesuffix("-Instruct")
        rows.append(goal(f"estimate / measured, {label}", ratio, f"1 +- {ESTIMATE_TOLERANCE}",
                         judged(ratio, lambda v: abs(v - 1) <= ESTIMATE_TOLERANCE)))  # fmt: skip
    return rows


def unsloth_goal(parts: dict[str, dict]) -> dict:
    """Unsloth's notebooks print torch.cuda.max_memory_reserved in GiB: compare like with like."""
    peak = parts.get("memory_qwen2_5_vl_7b", {}).get("measured", {}).get("run_peak", {})
    reserved = peak.get("max_memory_reserved")
    gib = None if reserved is None else reserved / 2**30
    limit = UNSLOTH_FACTOR * UNSLOTH_7B_GIB[1]
    return goal(
        "7B peak reserved (GiB) vs Unsloth", gib, f"<= {limit:.2f}", judged(gib, lambda v: v <= limit)
    )


def tiny_goal(parts: dict[str, dict]) -> dict:
    families = parts.get("tiny_families", {}).get("families", {})
    if not families:
        return goal("tiny families trained (4-bit + LoRA)", None, "all", None)
    trained = sum(r.get("status") == "ok" for r in families.values())
    return goal("tiny families trained (4-bit + LoRA)", trained, f"{len(families)} of {len(families)}",
                trained == len(families))  # fmt: skip


def packing_goals(part: dict) -> list[dict]:
    rows = []
    for hub_id in part.get("models") or PACKING_MODELS:
        ratio = part["models"][hub_id].get("packed_over_unpacked") if part.get("models") else None
        label = hub_id.split("/")[1].removesuffix("-Instruct")
        rows.append(goal(f"packed / unpacked real tokens/s, {label}", ratio, f">= {PACKED_OVER_UNPACKED}",
                         judged(ratio, lambda v: v >= PACKED_OVER_UNPACKED)))  # fmt: skip
    return rows


def resume_goal(parts: dict[str, dict]) -> dict:
    """Judged on CPU too: there the resume is exact, which is within any tolerance."""
    part = parts.get("resume", {})
    target = "1e-6, bf16"  # the first step absolute, then the bf16 envelope (RESUME_*)
    if "resume_within_tolerance" not in part:
        return goal("resume: losses vs uninterrupted", None, target, None)
    return goal("resume: losses vs uninterrupted", part.get("resume_max_rel_delta"), target,
                part["resume_within_tolerance"])  # fmt: skip


def print_report(results: dict, out: Path) -> None:
    print(f"\n{'part':24}{'status':>10}{'seconds':>9}  figures")
    for name, part in results["parts"].items():
        print(f"{name:24}{part['status']:>10}{part.get('seconds', 0):9.0f}  {headline(name, part)}")
    mark = {True: "PASS", False: "FAIL", None: "n/a"}
    print(f"\n{'goal':48}{'measured':>10}{'target':>12}{'':>6}")
    for row in results["goals"]:
        value = "-" if row["measured"] is None else f"{row['measured']:.3g}"
        print(f"{row['goal']:48}{value:>10}{row['target']:>12}{mark[row['pass']]:>6}")
    if results["mode"] == "dry-run":
        print("dry run on CPU: peaks are RSS high-water marks and the goals are not judged by these figures")
    print(f"\nwritten to {out}")


def headline(name: str, part: dict) -> str:
    """One line of figures per part, or its error."""
    if part["status"] not in ("ok",):
        return str(part.get("error", ""))[:120]
    if name == "env":
        return f"{part['device']['name']}; torch {part['packages'].get('torch')}, bnb {part['packages'].get('bitsandbytes')}"
    if name == "compare":
        a, b = part["A_vlmtune"], part["B_plain"]
        return (f"tokens/s {a['tokens_per_s']:.0f} vs {b['tokens_per_s']:.0f}; peak ratio {part['peak_ratio']:.2f}; "
                f"loss@1 {a['first_loss'][0]:.4f} vs {b['first_loss'][0]:.4f}")  # fmt: skip
    if name in MEMORY_PARTS:
        e = part["estimate_vs_measured"]
        return (f"measured {e['measured_bytes'] / 2**30:.2f} GiB ({e['measured_kind']}), estimate "
                f"{e['predicted_bytes'] / 2**30:.2f} GiB, ratio {e['ratio']:.2f}")  # fmt: skip
    if name == "tiny_families":
        ok = sum(r["status"] == "ok" for r in part["families"].values())
        return f"{ok} of {len(part['families'])} families trained"
    if name == "resume":
        return (f"saved at step {part['saved_on_signal_at_step']}; first step delta "
                f"{part['resume_first_step_delta']:.2g}, later max rel {part['resume_max_rel_delta']:.2g}")  # fmt: skip
    if name == "packing":
        return "; ".join(
            f"{hub_id.split('/')[1]}: {m['packed']['tokens_per_s']:.0f} vs {m['unpacked']['tokens_per_s']:.0f} "
            f"real tokens/s (MFU {m['packed']['mfu'] or 0:.1%} vs {m['unpacked']['mfu'] or 0:.1%})"
            for hub_id, m in part["models"].items()
        )
    if name in PERF_PARTS:
        return perf_headline(name, part)
    if name == "torch_compile":
        on, off = part["compile_on"], part["compile_off"]
        return (f"steady step {off['steady_step_s']:.3f} s off, {on['steady_step_s']:.3f} s on; "
                f"first step {off['first_step_s']:.1f} s / {on['first_step_s']:.1f} s")  # fmt: skip
    return ""


def perf_headline(name: str, part: dict) -> str:
    if name == "workloads":

        def arm(r: dict) -> str:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            return f"{r.get('tokens_per_s') or 0:.0f} tok/s{mfu}"

        return "; ".join(
            f"{w}: vlmtune {arm(r['vlmtune'])} vs plain {arm(r['plain'])}"
            for w, r in part.items() if isinstance(r, dict) and "vlmtune" in r
        )  # fmt: skip
    if name == "kernels":
        return ", ".join(f"{k} x{v['speedup']:.2f}" for k, v in part["kernels"].items())
    return (f"step time on/off {part['step_time_ratio_on_over_off']:.2f}, "
            f"peak on/off {part['peak_ratio_on_over_off'] or 0:.2f}")  # fmt: skip


# --- command line ---------------------------------------------------------------------------------

START = time.monotonic()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, 1-3 steps: checks the code")
    parser.add_argument(
        "--deadline", type=float, help="seconds for everything [default: 450 on GPU, 900 dry]"
    )
    parser.add_argument("--out", type=Path, help="result JSON [default: bench/results/gpu-DATE.json]")
    parser.add_argument(
        "--work", type=Path, help="checkpoints, data, run folders [default: .cache/bench-gpu]"
    )
    parser.add_argument("--parts", nargs="+", choices=list(PARTS),
                        default=[p for p in PARTS if p not in PERF_PARTS], help="run only these")  # fmt: skip
    parser.add_argument("--part", choices=list(PARTS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    s = DRY if args.dry_run else GPU
    suffix = "-dry-run" if args.dry_run else ""
    args.deadline = args.deadline or s.deadline_s
    args.work = args.work or ROOT / ".cache" / f"bench-gpu{suffix}"
    args.out = (
        args.out or (args.work if args.dry_run else HERE / "results") / f"gpu-{date.today()}{suffix}.json"
    )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    s = DRY if args.dry_run else GPU
    if args.part:
        sys.exit(run_part(args.part, s, args.work, args.result))
    results = drive(args, s)
    print_report(results, args.out)
    sys.exit(0 if all(p["status"] == "ok" for p in results["parts"].values()) else 1)


if __name__ == "__main__":
    main()
