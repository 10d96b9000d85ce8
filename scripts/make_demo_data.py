#!/usr/bin/env python3
"""Write the bundled demo dataset: coloured shapes on PNGs, questions whose answers need the image.

    python scripts/make_demo_data.py [OUT_DIR]      # default: data/demo

Deterministic (fixed seed, no timestamps): tests regenerate it and compare with the committed
files. 48 training samples (one image each, or two for the counting questions) and 12 eval ones.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((56, 56), (84, 56), (56, 84), (112, 112))


def draw(color: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = Image.new("RGB", size, (250, 250, 250))
    pen = ImageDraw.Draw(image)
    w, h = size
    side = rng.randint(min(w, h) // 2, min(w, h) - 8)
    x0, y0 = rng.randint(2, w - side - 2), rng.randint(2, h - side - 2)
    box = (x0, y0, x0 + side, y0 + side)
    fill = COLORS[color]
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def turn(role: str, text: str, images: list[str] = ()) -> dict:
    parts = [{"type": "image", "image": path} for path in images]
    return {"role": role, "content": [*parts, {"type": "text", "text": text}]}


def sample(kind: str, index: int, rng: random.Random, out: Path) -> dict:
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    first = f"images/{index:03d}.png"
    draw(color, shape, rng.choice(SIZES), rng).save(out / first)
    if kind == "color":
        return {
            "messages": [
                turn("user", "What color is the shape?", [first]),
                turn("assistant", f"The {shape} is {color}."),
            ]
        }
    if kind == "shape":
        return {
            "messages": [
                turn("user", "What shape is in the image?", [first]),
                turn("assistant", f"It is a {color} {shape}."),
            ]
        }
    second_color = rng.choice([c for c in COLORS if c != color])
    second = f"images/{index:03d}b.png"
    draw(second_color, rng.choice(SHAPES), rng.choice(SIZES), rng).save(out / second)
    return {
        "messages": [
            turn("user", "What colors are the two shapes?", [first, second]),
            turn("assistant", f"The first is {color} and the second is {second_color}."),
            turn("user", "Which one is first?"),
            turn("assistant", f"The {color} one."),
        ]
    }


def write(out: Path) -> None:
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    kinds = ("color", "shape", "color", "shape", "pair")
    rows = [sample(kinds[i % len(kinds)], i, rng, out) for i in range(60)]
    for name, part in (("train.jsonl", rows[:48]), ("eval.jsonl", rows[48:])):
        with (out / name).open("w", encoding="utf-8") as f:
            for row in part:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "demo"
    )
    write(target)
    print(f"demo dataset written to {target}")
