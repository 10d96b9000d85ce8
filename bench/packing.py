#!/usr/bin/env python3
"""Packing against length grouping and the plain stack: real (non-pad) tokens per second.

    OMP_NUM_THREADS=1 python bench/packing.py                 # CPU defaults: 2 rounds, 8 steps an arm
    python bench/packing.py --rounds 3 --steps 12 --hidden 512

A realistic mixed dataset: answers of 5 to 400 tokens, 0, 1 or 2 images a sample of several sizes
(56x56 up to 448x336 pixels: 4 to 192 image tokens each), drawn from a fixed seed. Arms, each in its
own process launch, interleaved P/G/B, P/G/B so machine noise hits all three:
  P  vlmtune, train.packing: true: rows of up to --budget tokens, one row a step
  G  vlmtune, train.group_by_length: true (the default), batch_size --batch: padded batches of
     samples of similar length
  B  the plain stack (bench/compare.py's arm B: TRL SFTTrainer, its vision collator, random order),
     batch_size --batch
All three train the same random-weight Qwen2-VL-shaped checkpoint (compare.py's, the real 151,936-token
vocabulary) with LoRA. A step's real tokens are those its batches hold without padding; a step's
time is from the end of one step to the end of the next (so collation, which packing changes,
counts); the first step is left out (warm-up). tokens/s = real tokens / time, summed over the
timed steps of every launch of an arm. Results: bench/results/packing-<date>.json and a table.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

from compare import build_checkpoint, checkpoint_name, run_arm_b
from harness import StepTimer, run_vlmtune

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORDS = [
    "the",
    "a",
    "circle",
    "square",
    "red",
    "blue",
    "green",
    "shape",
    "left",
    "right",
    "top",
    "bottom",
    "small",
    "large",
    "next",
    "to",
    "above",
    "below",
]
SIZES = ((56, 56), (112, 112), (224, 168), (168, 224), (448, 336))  # 4, 16, 48, 48, 192 image tokens


def build_data(out: Path, n: int, seed: int = 0) -> Path:
    """n samples: 0-2 images of SIZES, a short question, an answer of 5-400 words-ish tokens."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        parts = []
        for k in range(rng.choice((0, 1, 1, 2))):
            size = rng.choice(SIZES)
            image = Image.new("RGB", size, (250, 250, 250))
            ImageDraw.Draw(image).ellipse((4, 4, size[0] - 4, size[1] - 4), fill=(40 * k, 120, 200))
            name = f"images/{i:04d}-{k}.png"
            image.save(out / name)
            parts.append({"type": "image", "image": name})
        answer_words = int(rng.choice((5, 10, 20, 40, 80, 150, 250, 400)) * rng.uniform(0.7, 1.0))
        answer = " ".join(rng.choice(WORDS) for _ in range(answer_words)) + "."
        rows.append({"messages": [
            {"role": "user", "content": [*parts, {"type": "text", "text": "Describe what you see."}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})  # fmt: skip
    path = out / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_vlmtune_arm(args: argparse.Namespace, ckpt: Path, data: Path, out: Path, timer: StepTimer) -> None:
    out.mkdir(parents=True, exist_ok=True)
    knobs = (
        f"packing: true, max_tokens_per_batch: {args.budget}, batch_size: 1"
        if args.arm == "P"
        else f"group_by_length: true, batch_size: {args.batch}"
    )
    recipe = out / "recipe.yaml"
    recipe.write_text(f"""
model: {{name: {ckpt}}}
lora: {{r: 16, alpha: 16}}
data: {{train: {data}, max_image_pixels: {448 * 336}, shuffle: true}}
train: {{max_steps: {args.steps}, grad_accum: 1, lr: 1.0e-4, max_length: {args.budget}, logging_steps: 1,
        save_steps: 100000, gradient_checkpointing: true, heaviest_first: false, device: cpu, {knobs}}}
output: {{dir: {out}}}
""")
    with timer.watching():
        run_vlmtune(["train", str(recipe), "--run-dir", str(out / "run")])


def arm_main(args: argparse.Namespace) -> None:
    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import TrainerCallback
    from transformers.utils import logging

    logging.set_verbosity_error()
    ckpt, data = paths(args)
    timer = StepTimer("cpu")
    ends: list[float] = []

    class StepEnds(TrainerCallback):  # step ends, so a step's time includes fetching its batch
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    timer.callbacks.append(StepEnds())
    out = args.work / f"out-{args.arm}-{time.time_ns()}"
    if args.arm == "B":
        run_arm_b(ckpt, data, 448 * 336, out, args.steps, timer, "cpu")
    else:
        run_vlmtune_arm(args, ckpt, data, out, timer)
    steps = len(ends) - 1
    args.result.write_text(json.dumps({
        "arm": args.arm, "step_wall_s": [b - a for a, b in zip(ends, ends[1:], strict=False)],
        "batch_tokens": timer.batch_tokens[:steps], "losses": timer.losses,
    }))  # fmt: skip


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return args.work / checkpoint_name(args), args.work / f"packing-data-{args.samples}" / "train.jsonl"


def summary(runs: list[dict]) -> dict:
    tokens = sum(t for r in runs for t in r["batch_tokens"][1:])
    seconds = sum(s for r in runs for s in r["step_wall_s"][1:])
    return {
        "tokens_per_s": tokens / seconds,
        "real_tokens_per_step": tokens / sum(len(r["batch_tokens"][1:]) for r in runs),
        "seconds_per_step": seconds / sum(len(r["step_wall_s"][1:]) for r in runs),
        "first_losses": [r["losses"][0] for r in runs if r["losses"]],
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--batch", type=int, default=4, help="batch size of the G and B arms")
    parser.add_argument("--budget", type=int, default=2048, help="tokens per packed row (P), and max_length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--arms", default="PGB", help="which arms to run, e.g. PG")
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--arm", choices=["P", "G", "B"], help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.config, args.device = None, "cpu"  # compare.py's checkpoint builder reads them
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.arm:
        arm_main(args)
        return
    ckpt, data = paths(args)
    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, args)
    if not data.is_file():
        build_data(data.parent, args.samples)
    runs: dict[str, list[dict]] = {arm: [] for arm in args.arms}
    for round_index in range(args.rounds):
        for arm in args.arms:
            result = args.work / f"packing-result-{arm}-{round_index}.json"
            result.unlink(missing_ok=True)
            print(f"round {round_index + 1}/{args.rounds} arm {arm} ...", flush=True)
            forwarded = [a for a in (argv if argv is not None else sys.argv[1:])]
            subprocess.run(
                [sys.executable, __file__, *forwarded, "--arm", arm, "--result", str(result)], check=True
            )
            runs[arm].append(json.loads(result.read_text()))
    figures = {arm: summary(r) for arm, r in runs.items()}
    report = {
        "date": str(date.today()),
        "device": "cpu",
        "command": "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            k: getattr(args, k) for k in ("rounds", "steps", "samples", "batch", "budget", "hidden", "layers")
        },
        "arms": figures,
        "ratios": {
            f"P/{arm}": figures["P"]["tokens_per_s"] / figures[arm]["tokens_per_s"]
            for arm in figures
            if arm != "P" and "P" in figures
        },
    }
    out = args.out or HERE / "results" / f"packing-{date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    names = {"P": "packed", "G": "group_by_length", "B": "plain stack"}
    print(f"\n{'':18}{'real tokens/s':>14}{'real tokens/step':>18}{'s/step':>8}")
    for arm, f in figures.items():
        print(
            f"{names[arm]:18}{f['tokens_per_s']:14.1f}{f['real_tokens_per_step']:18.0f}{f['seconds_per_step']:8.2f}"
        )
    for key, ratio in report["ratios"].items():
        print(f"{key}: {ratio:.2f}x real tokens/s")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
