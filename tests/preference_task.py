"""A synthetic image task for the preference learning check: name the colour of a drawn shape.

Training images get an SFT sample ("What color is the shape?" -> "Red.") and a preference pair
(the right colour chosen, a wrong one rejected); held-out images, drawn afresh, get pairs only.
The answer needs the image: every colour is asked about equally often, with every shape.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
SIZES = ((56, 56), (84, 56), (56, 84))
QUESTION = "What color is the shape?"


def draw(color: str, shape: str, rng: random.Random) -> Image.Image:
    size = rng.choice(SIZES)
    image = Image.new("RGB", size, (250, 250, 250))
    w, h = size
    side = rng.randint(min(w, h) // 2, min(w, h) - 8)
    x0, y0 = rng.randint(2, w - side - 2), rng.randint(2, h - side - 2)
    box, fill, pen = (x0, y0, x0 + side, y0 + side), COLORS[color], ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=fill)
    elif shape == "square":
        pen.rectangle(box, fill=fill)
    else:
        pen.polygon([(x0 + side // 2, y0), (x0, y0 + side), (x0 + side, y0 + side)], fill=fill)
    return image


def write_task(folder: Path, n_train: int = 32, n_held_out: int = 16, seed: int = 0) -> Path:
    """folder/sft.jsonl, folder/pairs.jsonl (training images), folder/held_out.jsonl (new images)."""
    rng = random.Random(seed)
    names = list(COLORS)
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def examples(n: int, prefix: str) -> list[tuple[str, str, str]]:
        out = []
        for i in range(n):
            color = names[i % len(names)]
            path = f"images/{prefix}{i:03d}.png"
            draw(color, rng.choice(SHAPES), rng).save(folder / path)
            wrong = rng.choice([c for c in names if c != color])
            out.append((path, f"{color.capitalize()}.", f"{wrong.capitalize()}."))
        return out

    def write(name: str, rows: list[dict]) -> None:
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")

    train, held_out = examples(n_train, "train"), examples(n_held_out, "held")
    user = [{"type": "image"}, {"type": "text", "text": QUESTION}]
    write("sft.jsonl", [{"images": [p], "messages": [{"role": "user", "content": user},
                                                     {"role": "assistant", "content": right}]}
                        for p, right, _ in train])  # fmt: skip
    # RLAIF-V's columns for the pairs: image, question, chosen, rejected.
    for name, rows in (("pairs.jsonl", train), ("held_out.jsonl", held_out)):
        write(name, [{"image": p, "question": QUESTION, "chosen": right, "rejected": wrong}
                     for p, right, wrong in rows])  # fmt: skip
    return folder
