#!/usr/bin/env python3
"""The data pre-flight at scale: today's serial check against the new default, on the same samples.

    python bench/preflight.py                          # 100,000 samples in 5 shards (writes .cache/bench/)
    python bench/preflight.py --samples 5000 --shards 2 --arms baseline,fast,fast-serial,full

Generates a set of OpenAI-messages samples over a pool of real image files (photo-like JPEGs and
PNGs of many sizes, a few broken ones) under .cache/bench/preflight/ (not committed; reused when
present), then checks it with the tiny Qwen2-VL's processor at the recipe defaults
(data.max_image_pixels 602,112, train.max_length 2,048). Arms, interleaved shard by shard (the
order alternates) so machine noise hits all of them:

  baseline     every image decoded, every sample measured by the processor, one at a time:
               the pre-flight as it was before this benchmark's work (collator.count_tokens)
  fast         the default: images proven whole without decoding, lengths from image sizes,
               worker processes as data.check_workers: null picks them
  fast-serial  the same in one process (data.check_workers: 0)
  full         the default with data.image_check: full (every pixel decoded)

Every arm must give the same report on every shard: the same kept samples with the same token
counts, the same skipped samples (index and field) and the same dropped ones; the script stops
otherwise. Each fast arm starts cold on each shard (a new counter, new workers), as a real check
does once. Results: bench/results/preflight-<date>.json and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = ROOT / ".cache" / "bench" / "preflight"
MAX_IMAGE_PIXELS = 602_112  # the recipe default
MAX_LENGTH = 2048  # the recipe default
ARMS = ("baseline", "fast", "fast-serial", "full")

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
    from vlmtune.collator import VisionCollator
    from vlmtune.families import get_family
    from vlmtune.processing import load_processor
    from vlmtune.tiny import tiny_model_path

    family = get_family("qwen2_vl")
    processor = load_processor(tiny_model_path("qwen2_vl"), family, MAX_IMAGE_PIXELS)
    return VisionCollator(processor, family, max_length=None, train_on_responses_only=True)


def run_arm(arm: str, path: Path, vision_collator) -> tuple[float, object]:
    from vlmtune.lengths import TokenCounter
    from vlmtune.preflight import scan_split
    from vlmtune.recipe import DataSection

    keys = {"baseline": {"check_workers": 0}, "fast": {}, "fast-serial": {"check_workers": 0},
            "full": {"image_check": "full"}}[arm]  # fmt: skip
    data = DataSection(train=str(path), max_image_pixels=MAX_IMAGE_PIXELS, **keys)
    measure = vision_collator.count_tokens if arm == "baseline" else TokenCounter(vision_collator)
    start = time.perf_counter()
    report = scan_split("train", str(path), data, MAX_LENGTH, measure)
    return time.perf_counter() - start, report


def summary(report) -> dict:
    """What must not change between arms."""
    return {
        "kept": [s.index for s in report.samples],
        "lengths": report.lengths,
        "skipped": [(p.index, p.field) for p in report.skipped],
        "too_long": [p.index for p in report.too_long],
        "formats": dict(report.formats),
        "images_over_budget": report.images_over_budget,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--shards", type=int, default=5)
    parser.add_argument("--pool", type=int, default=4000, help="distinct image files the samples draw from")
    parser.add_argument("--arms", default="baseline,fast,fast-serial")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arms = args.arms.split(",")
    assert set(arms) <= set(ARMS) and "fast" in arms or "baseline" in arms, f"arms among {ARMS}"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    started = time.perf_counter()
    paths = write_shards(args.samples, args.shards, args.pool, args.seed)
    print(f"data ready in {time.perf_counter() - started:.0f} s: {args.samples} samples in {CACHE}")
    vision_collator = collator()
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    reports = []
    for s, path in enumerate(paths):
        order = arms if s % 2 == 0 else arms[::-1]
        results = {}
        for arm in order:
            elapsed, report = run_arm(arm, path, vision_collator)
            seconds[arm].append(elapsed)
            results[arm] = report
            print(f"shard {s} {arm:12} {elapsed:8.1f} s  {report.total / elapsed:8.1f} samples/s", flush=True)
        first = summary(results[arms[0]])
        for arm in arms[1:]:
            assert summary(results[arm]) == first, f"shard {s}: {arm} and {arms[0]} reports differ"
        reports.append(
            {"shard": str(path.name), **{k: len(v) if isinstance(v, list) else v for k, v in first.items()}}
        )
    report_table(seconds, reports, args, arms)


def report_table(seconds: dict[str, list[float]], reports: list[dict], args, arms: list[str]) -> None:
    total = {arm: sum(values) for arm, values in seconds.items()}
    base = total.get("baseline")
    print(f"\n{args.samples} samples, {args.shards} shards; the reports of every arm are identical")
    for arm in arms:
        rate = args.samples / total[arm]
        ratio = f"  {base / total[arm]:6.1f}x faster than baseline" if base and arm != "baseline" else ""
        print(
            f"{arm:12} {total[arm]:9.1f} s  {rate:8.1f} samples/s  {1000 * total[arm] / args.samples:7.2f} ms/sample{ratio}"
        )
    out = HERE / "results" / f"preflight-{date.today()}.json"
    out.write_text(
        json.dumps(
            {
                "date": str(date.today()),
                "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                "command": f"python bench/preflight.py --samples {args.samples} --shards {args.shards} "
                f"--pool {args.pool} --arms {','.join(arms)}",
                "seconds": seconds,
                "totals": total,
                "speedup_vs_baseline": {arm: base / total[arm] for arm in arms if base and arm != "baseline"},
                "median_shard_seconds": {arm: statistics.median(v) for arm, v in seconds.items()},
                "reports": reports,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"results: {out}")


if __name__ == "__main__":
    main()
