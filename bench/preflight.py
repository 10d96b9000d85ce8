#!/usr/bin/env python3
"""The data pre-flight at scale: today's serial check against the new default, on the same samples.

    python bench/preflight.py                          # 100,000 samples in 5 shards (writes .cache/bench/)
    python bench/preflight.py --samples 5000 --shards 2 --arms baseline,fast,fast-workers,full --baseline-every 1

Generates a set of OpenAI-messages samples over a pool of real image files (photo-like JPEGs and
PNGs of many sizes, a few broken ones) under .cache/bench/preflight/ (not committed; reused when
present), then checks it with the tiny Qwen2-VL's processor at the recipe defaults
(data.max_image_pixels 602,112, train.max_length 2,048). Arms, interleaved shard by shard (the
order alternates) so machine noise hits all of them:

  baseline     every image decoded, every sample measured by the processor, one at a time:
               the pre-flight as it was before this benchmark's work (collator.count_tokens)
  fast         the default: images proven whole without decoding, lengths from image sizes
               (data.check_workers: null, which is one process on a machine of fewer than 4 cores)
  fast-workers the same with two forked worker processes (data.check_workers: 2)
  full         the default with data.image_check: full (every pixel decoded)

Every arm must give the same report on every shard: the same kept samples with the same token
counts, the same skipped samples (index and field) and the same dropped ones; the script stops
otherwise. Each fast arm starts cold on each shard (a new counter, new workers), as a real check
does once. The baseline takes about a second per 10 samples on this project's 2-core machine (hours
for 100k), so by default it checks every 10th sample of each shard (--baseline-every), its report is
compared on those samples and its time is scaled to the shard: a serial, per-sample cost, which a
uniform tenth measures. Wall and CPU seconds (workers included) are both reported: on a shared
machine the wall clock also measures the neighbours. Results: bench/results/preflight-<date>.json
and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = ROOT / ".cache" / "bench" / "preflight"
MAX_IMAGE_PIXELS = 602_112  # the recipe default
MAX_LENGTH = 2048  # the recipe default
ARMS = ("baseline", "fast", "fast-workers", "full")

# Photo-like shapes (width, height) with their weights: what VQA and captioning sets hold most.
SHAPES = [((640, 480), 30), ((480, 640), 10), ((640, 427), 15), ((500, 375), 10), ((1024, 768), 10),
          ((1280, 720), 10), ((800, 800), 5), ((1600, 1200), 5), ((2048, 1536), 3), ((320, 240), 2)]  # fmt: skip
WORDS = [
    "the",
    "a",
    "red",
    "blue",
    "small",
    "large",
    "square",
    "circle",
    "image",
    "left",
    "right",
    "top",
    "bottom",
    "shows",
    "picture",
    "of",
    "in",
    "on",
]


# --- the data --------------------------------------------------------------------------------------


def photo(rng, width: int, height: int):
    """Smooth colour fields, a few shapes and sensor-like noise: compresses like a photo."""
    import numpy as np
    from PIL import Image, ImageDraw

    low = rng.integers(0, 256, (max(2, height // 96), max(2, width // 96), 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(20, max(21, min(width, height) // 2)))
        draw.ellipse((x, y, x + size, y + size), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_pool(folder: Path, count: int, seed: int) -> list[str]:
    """``count`` image files of many sizes (85% JPEG, 15% PNG) plus a few broken ones; their names."""
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng, pick = np.random.default_rng(seed), random.Random(seed)
    shapes, weights = zip(*SHAPES, strict=True)
    names = []
    for i in range(count):
        width, height = pick.choices(shapes, weights)[0]
        width += pick.randrange(-48, 49)  # many distinct sizes, as real sets have
        height += pick.randrange(-48, 49)
        name = f"{i:05d}.{'png' if pick.random() < 0.15 else 'jpg'}"
        if not (folder / name).exists():
            photo(rng, width, height).save(folder / name, quality=85)
        names.append(name)
    whole = (folder / names[0]).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    png = next(n for n in names if n.endswith(".png"))
    (folder / "truncated.png").write_bytes((folder / png).read_bytes()[:5000])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "not_an_image.jpg").write_text("a text file with a .jpg name\n")
    return names


def sample(pick: random.Random, names: list[str]) -> dict:
    """One OpenAI-messages sample: mostly one image, some two, some none; a few broken or too long."""
    roll = pick.random()
    images = 0 if roll < 0.1 else 2 if roll < 0.2 else 1
    question = " ".join(pick.choices(WORDS, k=pick.randint(4, 30))) + "?"
    answer = " ".join(pick.choices(WORDS, k=pick.randint(2, 60))) + "."
    chosen = [f"images/{pick.choice(names)}" for _ in range(images)]
    broken = pick.random()
    if broken < 0.002:
        chosen = ["images/missing.jpg"]
    elif broken < 0.004:
        chosen = [
            f"images/{pick.choice(['truncated.jpg', 'truncated.png', 'empty.jpg', 'not_an_image.jpg'])}"
        ]
    elif broken < 0.012:
        question = " ".join(pick.choices(WORDS, k=2500)) + "?"  # over max_length with any image
    user = [{"type": "image", "image": path} for path in chosen] + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    if broken > 0.995:  # an image part with no image behind it
        messages[0]["content"].insert(0, {"type": "image"})
    return {"messages": messages}


def write_shards(samples: int, shards: int, pool: int, seed: int) -> list[Path]:
    names = write_pool(CACHE / "images", pool, seed)
    pick = random.Random(seed + 1)
    paths = []
    per_shard = samples // shards
    for s in range(shards):
        path = CACHE / f"shard-{samples}-{s}.jsonl"
        if not path.exists():
            rows = [json.dumps(sample(pick, names)) for _ in range(per_shard)]
            path.write_text("\n".join(rows) + "\n")
        paths.append(path)
    return paths


# --- the arms ---------------------------------------------------------------------------------------


def collator():
    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor
    from vlmtune.model.tiny import tiny_model_path

    family = get_family("qwen2_vl")
    processor = load_processor(tiny_model_path("qwen2_vl"), family, MAX_IMAGE_PIXELS)
    return VisionCollator(processor, family, max_length=None, train_on_responses_only=True)


def run_arm(arm: str, path: Path, vision_collator) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process and its workers, report) of one check."""
    import resource

    from vlmtune.data.lengths import TokenCounter
    from vlmtune.data.preflight import scan_split
    from vlmtune.recipe import DataSection

    keys = {"baseline": {"check_workers": 0}, "fast": {}, "fast-workers": {"check_workers": 2},
            "full": {"image_check": "full"}}[arm]  # fmt: skip
    data = DataSection(train=str(path), max_image_pixels=MAX_IMAGE_PIXELS, **keys)
    measure = vision_collator.count_tokens if arm == "baseline" else TokenCounter(vision_collator)

    def cpu() -> float:
        own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    wall, used = time.perf_counter(), cpu()
    report = scan_split("train", str(path), data, MAX_LENGTH, measure)
    return time.perf_counter() - wall, cpu() - used, report


def every_nth(path: Path, n: int) -> Path:
    """The shard's samples 0, n, 2n, ... (the baseline's share when it would take hours)."""
    if n == 1:
        return path
    out = path.with_name(f"{path.stem}-every{n}.jsonl")
    if not out.exists():
        lines = path.read_text().splitlines()
        out.write_text("\n".join(lines[::n]) + "\n")
    return out


def summary(report, every: int = 1) -> dict:
    """What must not change between arms, on samples 0, every, 2*every, ... numbered 0, 1, 2, ..."""
    taken = [
        (s.index, n)
        for s, n in zip(report.samples, report.lengths or [None] * len(report.samples), strict=True)
    ]
    return {
        "kept": [(i // every, n) for i, n in taken if i % every == 0],
        "skipped": [(p.index // every, p.field) for p in report.skipped if p.index % every == 0],
        "too_long": [p.index // every for p in report.too_long if p.index % every == 0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--pool", type=int, default=4000, help="distinct image files the samples draw from")
    parser.add_argument("--arms", default="baseline,fast,fast-workers")
    parser.add_argument(
        "--baseline-every",
        type=int,
        default=10,
        help="the baseline checks every Nth sample of a shard (1: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arms = args.arms.split(",")
    assert set(arms) <= set(ARMS), f"arms among {ARMS}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    paths = write_shards(args.samples, args.shards, args.pool, args.seed)
    print(f"data ready in {time.perf_counter() - started:.0f} s: {args.samples} samples in {CACHE}")
    vision_collator = collator()
    every = args.baseline_every
    runs: list[dict] = []
    for s, path in enumerate(paths):
        order = arms if s % 2 == 0 else arms[::-1]
        results = {}
        for arm in order:
            checked = every_nth(path, every) if arm == "baseline" else path
            wall, cpu, report = run_arm(arm, checked, vision_collator)
            scale = every if arm == "baseline" else 1  # seconds for the whole shard
            runs.append({"shard": s, "arm": arm, "samples": report.total, "kept": len(report.samples),
                         "skipped": len(report.skipped), "dropped": len(report.too_long), "wall_s": wall,
                         "cpu_s": cpu, "shard_wall_s": wall * scale, "shard_cpu_s": cpu * scale})  # fmt: skip
            results[arm] = report
            print(
                f"shard {s} {arm:12} {report.total:6} samples {wall:8.1f} s wall {cpu:8.1f} s CPU", flush=True
            )
        fast = [arm for arm in arms if arm != "baseline"]
        for arm in fast[1:]:
            assert summary(results[arm]) == summary(results[fast[0]]), (
                f"shard {s}: {arm} differs from {fast[0]}"
            )
        if "baseline" in results and fast:
            assert summary(results["baseline"]) == summary(results[fast[0]], every), (
                f"shard {s}: the baseline's report differs from {fast[0]}'s on the samples both checked"
            )
    report_table(runs, args, arms)


def report_table(runs: list[dict], args, arms: list[str]) -> None:
    total = {
        arm: {k: sum(r[k] for r in runs if r["arm"] == arm) for k in ("shard_wall_s", "shard_cpu_s")}
        for arm in arms
    }
    base = total.get("baseline")
    ratios = {}
    print(
        f"\n{args.samples} samples, {args.shards} shards; every arm's report is the same on the samples it checked"
    )
    for arm in arms:
        wall, cpu = total[arm]["shard_wall_s"], total[arm]["shard_cpu_s"]
        line = f"{arm:12} {wall:9.1f} s wall {cpu:9.1f} s CPU  {args.samples / wall:8.1f} samples/s"
        if base and arm != "baseline":
            per_shard = [
                b["shard_wall_s"] / r["shard_wall_s"]
                for b, r in zip(
                    [r for r in runs if r["arm"] == "baseline"],
                    [r for r in runs if r["arm"] == arm],
                    strict=True,
                )
            ]
            ratios[arm] = {
                "wall": base["shard_wall_s"] / wall,
                "cpu": base["shard_cpu_s"] / cpu,
                "wall_per_shard": per_shard,
            }
            line += f"  {ratios[arm]['wall']:5.1f}x wall, {ratios[arm]['cpu']:5.1f}x CPU faster than baseline"
            line += f" (shards {min(per_shard):.1f}x-{max(per_shard):.1f}x)"
        print(line)
    if base and args.baseline_every > 1:
        print(f"(baseline: every {args.baseline_every}th sample checked, its time scaled to the whole shard)")
    out = HERE / "results" / f"preflight-{date.today()}.json"
    out.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "machine": f"{platform.node()}, {platform.machine()}, {os.cpu_count()} cores, shared",
                "command": f"python bench/preflight.py --samples {args.samples} --shards {args.shards} "
                f"--pool {args.pool} --arms {','.join(arms)} --baseline-every {args.baseline_every}",
                "totals": total,
                "speedup_vs_baseline": ratios,
                "runs": runs,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
