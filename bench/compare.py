#!/usr/bin/env python3
"""vlmtune vs the plain stack: same model, same data, same steps; step time, tokens/s, peak memory.

    python bench/compare.py                   # CPU defaults: 2 rounds, 6 steps per arm launch
    python bench/compare.py --rounds 3 --steps 8 --layers 4 --hidden 1024
    python bench/compare.py --image-side 896  # 896x896 and 1344x896 images: 1,024-1,536 tokens each
    python bench/compare.py --device cuda --config Qwen/Qwen2-VL-2B-Instruct --rounds 1 --steps 10

Arms, each run in its own process launch, interleaved A/B/A/B so machine noise hits both:
  A  vlmtune through its CLI (`vlmtune train` on a recipe: load -> lora -> sft with its collator
     and supervised-positions loss)
  B  the plain stack as its documentation shows it: AutoModelForImageTextToText +
     BitsAndBytesConfig + peft LoraConfig + TRL SFTTrainer with its default vision collator
     (assistant_only_loss=True, so both arms optimise the same labels).
Both load the same random-weight checkpoint (Qwen2-VL shapes, the real 151,936-token vocabulary:
--hidden/--layers with a 256-wide vision tower, or every shape of a bundled config with --config),
keep the same modules in 16 bit, put LoRA on the same modules and see the samples in the same
order; the script checks that both report the same loss at step 1 and train the same number of
parameters, so the comparison is of the same work. Peak memory is the process's RSS high-water
mark (VmHWM) on CPU, and torch.cuda.max_memory_allocated / max_memory_reserved on CUDA. Results go
to bench/results/compare-<date>-images<side>[-cuda].json (or --out) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from harness import (
    StepTimer,
    build_random_checkpoint,
    bundled_config,
    current_rss_mb,
    peak_rss_mb,
    run_vlmtune,
)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
QWEN_VISION_SKIP = ["model.visual", "lm_head"]
# LoRA targets of the plain arm, written as its user would (FACTS.md: Qwen2-VL's vision Linears are
# attn.qkv attn.proj mlp.fc1 mlp.fc2; the merger stays out): the same modules vlmtune's toggles pick.
QWEN2_VL_LORA_TARGETS = (
    r"^(?:(?!model\.visual\.merger(?:\.|$))model\.visual\.(?:.*\.)?(?:attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    r"|model\.language_model\.(?:.*\.)?(?:q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj))$"
)
SAME_LOSS_TOLERANCE = 0.02  # relative: bf16 kernels of the two arms differ in summation order
__all__ = ["current_rss_mb", "peak_rss_mb", "StepTimer"]  # bench/rss_timeline.py reads them from here


# --- shared fixtures: the checkpoint and the data --------------------------------------------------


def qwen2_vl_shape(hidden: int, layers: int, vocab: int) -> dict:
    """A Qwen2-VL config of the given text width and depth, with a 256-wide vision tower."""
    heads = hidden // 64
    return dict(
        model_type="qwen2_vl",
        text_config=dict(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), max_position_embeddings=8192,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [8, 12, 12]},
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=layers, embed_dim=256, num_heads=4, mlp_ratio=4, hidden_size=hidden,
                           patch_size=14, temporal_patch_size=2, spatial_merge_size=2),
        tie_word_embeddings=False,
    )  # fmt: skip


def checkpoint_name(args: argparse.Namespace) -> str:
    if args.config:
        return args.config.replace("/", "--")
    return f"qwen2vl-h{args.hidden}-l{args.layers}-v{args.vocab}"


def build_checkpoint(out: Path, args: argparse.Namespace) -> None:
    """Random weights at Qwen2-VL shapes; the tiny model's tokenizer and processor files."""
    shape = (
        bundled_config(args.config) if args.config else qwen2_vl_shape(args.hidden, args.layers, args.vocab)
    )
    if shape["model_type"] != "qwen2_vl":
        sys.exit(
            f"--config {args.config} is a {shape['model_type']} model; the plain arm is written for Qwen2-VL"
        )
    build_random_checkpoint(shape, "qwen2_vl", out, args.device)


def max_pixels(side: int) -> int:
    """The pixel budget that admits both image shapes of build_data unscaled."""
    return side * 3 // 2 * side


def build_data(out: Path, side: int, n: int = 24, widths: tuple[float, ...] = (1.0, 1.5)) -> Path:
    """Image-heavy samples, short answers: images SIDE high and SIDE x each of ``widths`` wide, in turn.

    At the default side of 448 that is 256 or 384 image tokens per sample.
    """
    from PIL import Image, ImageDraw

    (out / "images").mkdir(parents=True, exist_ok=True)
    colors = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
    rows = []
    for i in range(n):
        name = list(colors)[i % 3]
        size = (int(side * widths[i % len(widths)]), side)
        image = Image.new("RGB", size, (250, 250, 250))
        ImageDraw.Draw(image).ellipse((60, 60, 300, 300), fill=colors[name])
        image.save(out / "images" / f"{i:03d}.png")
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"images/{i:03d}.png"},
                                         {"type": "text", "text": "What color is the circle?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": f"The circle is {name}."}]},
        ]})  # fmt: skip
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --- arms (each runs inside its own process) -----------------------------------------------------


def run_arm_a(
    ckpt: Path, data: Path, pixels: int, out: Path, steps: int, timer: StepTimer, device: str = "cpu"
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    recipe = out / "recipe.yaml"
    recipe.write_text(f"""
model: {{name: {ckpt}}}
lora: {{r: 16, alpha: 16}}
data: {{train: {data}, max_image_pixels: {pixels}, shuffle: false}}
train: {{max_steps: {steps}, batch_size: 2, grad_accum: 1, lr: 1.0e-4, max_length: 4096, logging_steps: 1,
        save_steps: 100000, group_by_length: false, gradient_checkpointing: true, device: {device}}}
output: {{dir: {out}}}
""")
    with timer.watching():
        run_vlmtune(["train", str(recipe), "--run-dir", str(out / "run")])


def run_arm_b(
    ckpt: Path, data: Path, pixels: int, out: Path, steps: int, timer: StepTimer, device: str = "cpu"
) -> None:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    processor = load_processor(
        ckpt, get_family("qwen2_vl"), pixels
    )  # AutoProcessor, minus the torchvision-only video part
    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=QWEN_VISION_SKIP,
    )  # fmt: skip
    placement = (
        {"device_map": {"": device}} if device != "cpu" else {}
    )  # CPU: the loader's default, as before
    model = AutoModelForImageTextToText.from_pretrained(
        ckpt, quantization_config=bnb, dtype=torch.bfloat16, **placement
    )
    for module in model.modules():  # the CPU repacking trap (FACTS.md) hits the plain stack too
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    dataset = trl_dataset(data)
    args = SFTConfig(
        output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=2, gradient_accumulation_steps=1,
        learning_rate=1e-4, lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=device == "cpu", bf16=True, gradient_checkpointing=True,
        gradient_checkpointing_kwargs={"use_reentrant": False}, max_length=None, assistant_only_loss=True,
        seed=3407, disable_tqdm=True, warmup_steps=0,
    )  # fmt: skip
    peft_config = LoraConfig(r=16, lora_alpha=16, target_modules=QWEN2_VL_LORA_TARGETS, task_type="CAUSAL_LM")
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=processor, peft_config=peft_config
    )
    with timer.watching():
        trainer.train()


def trl_dataset(data: Path) -> Any:
    """The jsonl as TRL's vision SFT dataset: messages with bare image parts, and an `images` column."""
    from datasets import Dataset
    from PIL import Image

    rows = [json.loads(line) for line in data.read_text().splitlines()]
    return Dataset.from_list([
        {"messages": [{"role": m["role"], "content": [{"type": p["type"], **({"text": p["text"]} if "text" in p else {})}
                                                      for p in m["content"]]} for m in r["messages"]],
         "images": [Image.open(data.parent / p["image"]).convert("RGB")
                    for m in r["messages"] for p in m["content"] if p["type"] == "image"]}
        for r in rows
    ])  # fmt: skip


def arm_main(
    arm: str, ckpt: Path, data: Path, pixels: int, out: Path, steps: int, result: Path, device: str
) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging

    logging.set_verbosity_error()
    timer = StepTimer(device)
    (run_arm_a if arm == "A" else run_arm_b)(ckpt, data, pixels, out, steps, timer, device)
    figures = timer.summary()
    peak = figures["run_peak"]
    result.write_text(json.dumps({
        "arm": arm, "device": device, "step_seconds": timer.seconds, "losses": timer.losses,
        "batch_tokens": timer.batch_tokens[: len(timer.seconds)], "trainable_params": timer.trainable_params,
        "peak_rss_mb": host_peak_mb(peak),
        "rss_before_training_mb": timer.rss_before_training_mb,
        "cuda_max_allocated": peak.get("max_memory_allocated"), "cuda_max_reserved": peak.get("max_memory_reserved"),
        "cuda_allocated_before_training": figures["before_training"].get("allocated"),
    }))  # fmt: skip


def host_peak_mb(run_peak: dict) -> float:
    """The process's whole RSS high-water mark: the probe resets VmHWM at train begin on CPU only."""
    return run_peak["rss_hwm"] / 2**20 if run_peak["kind"] == "rss_hwm" else peak_rss_mb()


# --- driver ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument(
        "--config", help="every shape from a bundled config instead, e.g. Qwen/Qwen2-VL-2B-Instruct"
    )
    parser.add_argument(
        "--image-side", type=int, default=448, help="images are SIDE x SIDE and 1.5 SIDE x SIDE"
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--out", type=Path, help="result JSON [default: bench/results/compare-...json]")
    parser.add_argument("--arm", choices=["A", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Build what is missing, launch the arms interleaved, write and print the report; return it."""
    ckpt = args.work / checkpoint_name(args)
    data = args.work / f"data-{args.image_side}" / "train.jsonl"
    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, args)
    if not data.is_file():
        build_data(data.parent, args.image_side)
    runs: dict[str, list[dict]] = {"A": [], "B": []}
    for round_index in range(args.rounds):
        for arm in ("A", "B"):
            result = args.work / f"result-{args.image_side}-{args.device}-{arm}-{round_index}.json"
            result.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--arm", arm, "--result", str(result), "--steps", str(args.steps),
                   "--hidden", str(args.hidden), "--layers", str(args.layers), "--vocab", str(args.vocab),
                   "--image-side", str(args.image_side), "--work", str(args.work), "--device", args.device,
                   *(["--config", args.config] if args.config else [])]  # fmt: skip
            print(f"round {round_index + 1}/{args.rounds} arm {arm} ...", flush=True)
            subprocess.run(cmd, check=True)
            runs[arm].append(json.loads(result.read_text()))
    return report(runs, args)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt = args.work / checkpoint_name(args)
    if args.arm:
        out = args.work / f"out-{args.arm}-{time.time_ns()}"
        data = args.work / f"data-{args.image_side}" / "train.jsonl"
        arm_main(args.arm, ckpt, data, max_pixels(args.image_side), out, args.steps, args.result, args.device)
        return
    result = run(args)
    if not result["same_loss_at_step_1"]:
        sys.exit("the arms did not start from the same loss: they are not doing the same work")


def summary(runs: list[dict]) -> dict:
    steps = [s for r in runs for s in r["step_seconds"][1:]]  # the first step warms caches
    median = statistics.median(steps)
    tokens = statistics.fmean(t for r in runs for t in r["batch_tokens"])
    out = {
        "median_step_s": median,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        # what training adds on top of the imports, the loaded model and the data
        "training_rss_mb": statistics.median(r["peak_rss_mb"] - r["rss_before_training_mb"] for r in runs),
        "first_loss": [r["losses"][0] for r in runs],
        "steps": [len(r["step_seconds"]) for r in runs],
        "losses": [r["losses"] for r in runs],
        "trainable_params": runs[0]["trainable_params"],
    }
    if runs[0]["device"] == "cuda":
        out["cuda_max_allocated"] = statistics.median(r["cuda_max_allocated"] for r in runs)
        out["cuda_max_reserved"] = statistics.median(r["cuda_max_reserved"] for r in runs)
        out["cuda_training_allocated"] = statistics.median(
            r["cuda_max_allocated"] - r["cuda_allocated_before_training"] for r in runs
        )
    return out


def same_loss(a: list[float], b: list[float]) -> bool:
    return all(abs(x - y) <= SAME_LOSS_TOLERANCE * abs(y) for x, y in zip(a, b, strict=True))


def report(runs: dict[str, list[dict]], args: argparse.Namespace) -> dict:
    a, b = summary(runs["A"]), summary(runs["B"])
    peak_key = "cuda_max_allocated" if args.device == "cuda" else "peak_rss_mb"
    ratios = {
        "step_time": a["median_step_s"] / b["median_step_s"],
        "tokens_per_s": a["tokens_per_s"] / b["tokens_per_s"],
        "peak_rss": a["peak_rss_mb"] / b["peak_rss_mb"],
        "training_rss": a["training_rss_mb"] / b["training_rss_mb"],
    }
    if args.device == "cuda":
        ratios["cuda_max_allocated"] = a["cuda_max_allocated"] / b["cuda_max_allocated"]
        ratios["cuda_max_reserved"] = a["cuda_max_reserved"] / b["cuda_max_reserved"]
    result = {
        "date": str(date.today()),
        "device": args.device,
        "config": {
            "shape": args.config or {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab},
            "steps": args.steps,
            "rounds": args.rounds,
            "batch_size": 2,
            "image_side": args.image_side,
            "tokens_per_step": a["tokens_per_step"],
        },
        "peak_kind": "cuda max_memory_allocated" if args.device == "cuda" else "RSS high-water mark (VmHWM)",
        "A_vlmtune": a,
        "B_plain": b,
        "ratios_A_over_B": ratios,
        "peak_ratio": a[peak_key] / b[peak_key],
        "same_loss_at_step_1": same_loss(a["first_loss"], b["first_loss"]),
        "same_loss_tolerance": SAME_LOSS_TOLERANCE,
        "same_tokens": a["tokens_per_step"] == b["tokens_per_step"],
        "same_trainable_params": a["trainable_params"] == b["trainable_params"],
    }
    suffix = "-cuda" if args.device == "cuda" else ""
    out = args.out or HERE / "results" / f"compare-{date.today()}-images{args.image_side}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result, out)
    return result


def print_table(result: dict, out: Path) -> None:
    a, b, r = result["A_vlmtune"], result["B_plain"], result["ratios_A_over_B"]
    print(f"\n{'':26}{'vlmtune (A)':>14}{'plain (B)':>14}{'A/B':>8}")
    print(f"{'median step (s)':26}{a['median_step_s']:14.3f}{b['median_step_s']:14.3f}{r['step_time']:8.2f}")
    print(f"{'tokens/s':26}{a['tokens_per_s']:14.1f}{b['tokens_per_s']:14.1f}{r['tokens_per_s']:8.2f}")
    if result["device"] == "cuda":
        for key in ("cuda_max_allocated", "cuda_max_reserved"):
            print(f"{key + ' (MiB)':26}{a[key] / 2**20:14.0f}{b[key] / 2**20:14.0f}{r[key]:8.2f}")
    print(f"{'peak RSS (MB)':26}{a['peak_rss_mb']:14.0f}{b['peak_rss_mb']:14.0f}{r['peak_rss']:8.2f}")
    print(f"{'  of which training (MB)':26}{a['training_rss_mb']:14.0f}{b['training_rss_mb']:14.0f}"
          f"{r['training_rss']:8.2f}")  # fmt: skip
    print(f"{'loss at step 1':26}{str([round(x, 4) for x in a['first_loss']]):>14}"
          f"{str([round(x, 4) for x in b['first_loss']]):>14}")  # fmt: skip
    print(
        f"same loss at step 1 ({result['same_loss_tolerance']:.0%}): {result['same_loss_at_step_1']}; "
        f"same tokens: {result['same_tokens']}; same trainable params: {result['same_trainable_params']}\n"
        f"written to {out}"
    )


if __name__ == "__main__":
    main()
