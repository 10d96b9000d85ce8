#!/usr/bin/env python3
"""Write the colour-naming set of the GRPO example (docs/rl.md): one shape per PNG, one-word answers.

    python scripts/make_colour_data.py [OUT_DIR]      # default: data/colours

Deterministic (fixed seeds, no timestamps): a test regenerates it and compares with the committed
files. 48 training samples and 16 held-out ones (eval.jsonl, drawn with another seed): colours
and shapes in turn, sizes and positions at random. The answers are a vocabulary of four words, so
a short SFT run teaches the words before it teaches the colours: what a reward can then sharpen.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

QUESTION = "What colour is the shape? Answer with one word."
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 30), "blue": (30, 60, 220), "yellow": (230, 210, 30)}
SHAPES = ("square", "circle")
SIZES = ((56, 56), (84, 56), (56, 84))
SPLITS = {"train": (48, 1), "eval": (16, 2)}  # name -> (samples, seed)


def draw(colour: str, shape: str, size: tuple[int, int], shift: tuple[int, int]) -> Image.Image:
    image = Image.new("RGB", size, (255, 255, 255))
    (width, height), (dx, dy) = size, shift
    box = (width // 5 + dx, height // 5 + dy, 4 * width // 5 + dx, 4 * height // 5 + dy)
    pen = ImageDraw.Draw(image)
    (pen.ellipse if shape == "circle" else pen.rectangle)(box, fill=COLOURS[colour])
    return image


def write_split(out: Path, name: str, count: int, seed: int) -> None:
    rng = random.Random(seed)
    lines = []
    for i in range(count):
        colour, shape = list(COLOURS)[i % len(COLOURS)], SHAPES[i // len(COLOURS) % len(SHAPES)]
        path = f"images/{name}-{i:03d}.png"
        draw(colour, shape, rng.choice(SIZES), (rng.randint(-4, 4), rng.randint(-4, 4))).save(out / path)
        user = {
            "role": "user",
            "content": [{"type": "image", "image": path}, {"type": "text", "text": QUESTION}],
        }
        lines.append(json.dumps({"messages": [user, {"role": "assistant", "content": colour}]}))
    (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    for name, (count, seed) in SPLITS.items():
        write_split(out, name, count, seed)
    print(f"wrote {sum(count for count, _ in SPLITS.values())} samples to {out}")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "data" / "colours"
    )
