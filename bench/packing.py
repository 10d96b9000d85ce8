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
Each step's process CPU time is recorded beside its wall time: on a machine shared with other jobs
the wall time mostly measures this process's share of the cores, the CPU time its work.

    OMP_NUM_THREADS=1 python bench/packing.py --epoch --arms PG --samples 32    # the same work in each arm

--epoch: P and G each train one whole epoch (every step timed, the first too), so both arms process
exactly the same samples: the timed steps of a few-step launch hold different samples in each arm
(length grouping runs its longest batches first, packed rows come in a random order), and the share
of supervised tokens, which cost most on CPU, differs between them.

    OMP_NUM_THREADS=1 python bench/packing.py --profile       # where a step's time goes, one process

--profile times one packed row (with sdpa's whole-row block-causal mask, then with vlmtune's
per-sample attention) and one length-grouped batch of --batch samples, one step each under
torch.profiler (4-bit + LoRA r16, as the arms), and splits the time into lm_head + cross-entropy
(every op on a vocabulary-wide tensor), attention (sdpa) and the rest:
bench/results/packing-profile-<date>.json.
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
train: {{max_steps: {-1 if args.epoch else args.steps}, epochs: 1, grad_accum: 1, lr: 1.0e-4, max_length: {args.budget}, logging_steps: 1,
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
    ends: list[tuple[float, float]] = []  # (wall, process CPU) seconds at each step's end

    class StepEnds(TrainerCallback):  # step ends, so a step's time includes fetching its batch
        def on_train_begin(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

        def on_step_end(self, *a, **k):
            ends.append((time.perf_counter(), time.process_time()))

    timer.callbacks.append(StepEnds())
    out = args.work / f"out-{args.arm}-{time.time_ns()}"
    if args.arm == "B":
        run_arm_b(ckpt, data, 448 * 336, out, args.steps, timer, "cpu")
    else:
        run_vlmtune_arm(args, ckpt, data, out, timer)
    steps = len(ends) - 1
    args.result.write_text(json.dumps({
        "arm": args.arm, "step_wall_s": [b[0] - a[0] for a, b in zip(ends, ends[1:], strict=False)],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(ends, ends[1:], strict=False)],
        "batch_tokens": timer.batch_tokens[:steps], "losses": timer.losses,
    }))  # fmt: skip


def profile_main(args: argparse.Namespace) -> None:
    import torch

    from vlmtune.data.collator import VisionCollator
    from vlmtune.data.packing import SAMPLE_LENGTHS, PackedCollator, pack
    from vlmtune.data.preflight import read_split
    from vlmtune.recipe import DataSection, LoraSection, ModelSection, QuantizationSection
    from vlmtune.stages import load, lora
    from vlmtune.training.packed import packed_positions
    from vlmtune.training.packed_attention import SAMPLE_ATTENTION, use_per_sample_attention
    from vlmtune.training.trainer import unpacked_keys

    ckpt, data = prepared(args)
    samples = read_split(str(data), DataSection(train=str(data), max_image_pixels=448 * 336)).samples
    loaded = load.load(ModelSection(name=str(ckpt)), QuantizationSection(), 448 * 336, "cpu")
    adapters = LoraSection(r=16, alpha=16)
    model = lora.apply(loaded.model, adapters, lora.plan(loaded.model, loaded.family, adapters), seed=0)
    model.train()
    base = model.get_base_model()
    collator = VisionCollator(
        loaded.processor, loaded.family, max_length=args.budget, train_on_responses_only=True
    )
    lengths = [int(collator([sample])["input_ids"].shape[1]) for sample in samples]
    rows = pack(lengths, args.budget, seed=0).rows
    row = sorted(rows, key=len)[len(rows) // 2]  # a row of the median sample count
    packed = PackedCollator(collator, loaded.family)([samples[i] for i in row])
    packed_inputs = unpacked_keys(packed, packed_positions(base, loaded.family, packed))
    by_length = sorted(range(len(samples)), key=lambda i: lengths[i])
    groups = [by_length[k : k + args.batch] for k in range(0, len(by_length) - args.batch + 1)]
    group = min(groups, key=lambda g: abs(sum(lengths[i] for i in g) - args.budget // 2))  # G's mean batch
    grouped_inputs = collator([samples[i] for i in group])
    use_per_sample_attention(model)
    text = base.config.get_text_config()
    report = {"date": str(date.today()), "device": "cpu", "torch_threads": torch.get_num_threads(),
              "packed_sample_lengths": packed[SAMPLE_LENGTHS].tolist(),
              "grouped_sample_lengths": [lengths[i] for i in group], "steps": []}  # fmt: skip
    arms = [("packed, sdpa whole-row mask", packed_inputs, "sdpa"),
            ("packed, per-sample sdpa", packed_inputs, SAMPLE_ATTENTION),
            (f"length-grouped batch of {args.batch}, sdpa", grouped_inputs, "sdpa")]  # fmt: skip
    for _ in range(args.rounds):
        for name, inputs, attention in arms:
            text._attn_implementation = attention
            report["steps"].append(
                {"arm": name, "attention": attention, **profiled_step(model, base, inputs)}
            )
            print(step_line(report["steps"][-1]), flush=True)
    out = args.out or HERE / "results" / f"packing-profile-{date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


def profiled_step(model, base, inputs: dict) -> dict:
    """One warm-up step, then one forward + backward under torch.profiler: seconds per part."""
    from torch.profiler import ProfilerActivity, profile

    from vlmtune.constants import IGNORE_INDEX
    from vlmtune.training.loss import lm_head_input, logit_transform, supervised_cross_entropy

    vocab = str(base.get_output_embeddings().weight.shape[0])
    lm_head = base.get_output_embeddings()

    def step() -> None:
        with lm_head_input(lm_head) as captured:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False)
        loss = supervised_cross_entropy(
            captured.hidden, inputs["labels"], lm_head, **logit_transform(base.config.get_text_config())
        ).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        started = time.perf_counter()
        step()
        wall = time.perf_counter() - started
    parts = {"lm_head_and_cross_entropy": 0.0, "attention": 0.0, "rest": 0.0}
    for event in prof.key_averages(group_by_input_shape=True):
        if vocab in str(event.input_shapes):
            parts["lm_head_and_cross_entropy"] += event.self_cpu_time_total / 1e6
        elif "scaled_dot_product" in event.key:
            parts["attention"] += event.self_cpu_time_total / 1e6
        else:
            parts["rest"] += event.self_cpu_time_total / 1e6
    real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else inputs["input_ids"].numel()
    supervised = int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
    return {"wall_s": wall, "parts_s": parts, "real_tokens": real, "supervised_tokens": supervised}


def step_line(step: dict) -> str:
    total = sum(step["parts_s"].values())
    shares = ", ".join(f"{k} {v:.2f} s ({v / total:.0%})" for k, v in step["parts_s"].items())
    return (
        f"{step['arm']:38} {step['real_tokens']:5} real, {step['supervised_tokens']:5} supervised tokens, "
        f"{step['wall_s']:6.2f} s: {shares}; {1000 * total / step['supervised_tokens']:.1f} ms a supervised token"
    )


def prepared(args: argparse.Namespace) -> tuple[Path, Path]:
    """The checkpoint and the data, built on first use."""
    ckpt, data = paths(args)
    if not (ckpt / "config.json").is_file():
        build_checkpoint(ckpt, args)
    if not data.is_file():
        build_data(data.parent, args.samples)
    return ckpt, data


def paths(args: argparse.Namespace) -> tuple[Path, Path]:
    return args.work / checkpoint_name(args), args.work / f"packing-data-{args.samples}" / "train.jsonl"


def summary(runs: list[dict], skip: int) -> dict:
    """Real tokens per wall second and per CPU second over the steps after the first ``skip`` of each launch."""
    tokens = sum(t for r in runs for t in r["batch_tokens"][skip:])
    seconds = sum(s for r in runs for s in r["step_wall_s"][skip:])
    cpu = sum(s for r in runs for s in r.get("step_cpu_s", [])[skip:])
    steps = sum(len(r["step_wall_s"][skip:]) for r in runs)
    return {
        "tokens_per_s": tokens / seconds,
        "tokens_per_cpu_s": tokens / cpu if cpu else None,
        "real_tokens_per_step": tokens / steps,
        "seconds_per_step": seconds / steps,
        "cpu_seconds_per_step": cpu / steps if cpu else None,
        "timed_steps": steps,
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
    parser.add_argument("--epoch", action="store_true", help="P and G train one whole epoch each (see above)")
    parser.add_argument("--profile", action="store_true", help="profile one step of each kind (see above)")
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
    if args.profile:
        profile_main(args)
        return
    if args.epoch and "B" in args.arms:
        sys.exit("--epoch compares the vlmtune arms: pass --arms PG")
    prepared(args)
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
    figures = {arm: summary(r, skip=0 if args.epoch else 1) for arm, r in runs.items()}
    report = {
        "date": str(date.today()),
        "device": "cpu",
        "command": "python bench/packing.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            k: getattr(args, k)
            for k in ("rounds", "steps", "epoch", "samples", "batch", "budget", "hidden", "layers")
        },
        "arms": figures,
        "ratios": {
            f"P/{arm}": figures["P"]["tokens_per_s"] / figures[arm]["tokens_per_s"]
            for arm in figures
            if arm != "P" and "P" in figures
        },
        "cpu_ratios": {
            f"P/{arm}": figures["P"]["tokens_per_cpu_s"] / figures[arm]["tokens_per_cpu_s"]
            for arm in figures
            if arm != "P" and "P" in figures and figures[arm]["tokens_per_cpu_s"]
        },
    }
    out = args.out or HERE / "results" / f"packing-{date.today()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    names = {"P": "packed", "G": "group_by_length", "B": "plain stack"}
    print(f"\n{'':18}{'real tokens/s':>14}{'tokens/CPU s':>14}{'real tokens/step':>18}{'s/step':>8}")
    for arm, f in figures.items():
        print(
            f"{names[arm]:18}{f['tokens_per_s']:14.1f}{f['tokens_per_cpu_s'] or 0:14.1f}"
            f"{f['real_tokens_per_step']:18.0f}{f['seconds_per_step']:8.2f}"
        )
    for key, ratio in report["ratios"].items():
        print(
            f"{key}: {ratio:.2f}x real tokens/s, {report['cpu_ratios'].get(key, 0):.2f}x real tokens per CPU second"
        )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
