#!/usr/bin/env python3
"""Write the demo's preference pairs from its SFT samples: the right answer chosen, a wrong one rejected.

    python scripts/make_demo_pairs.py [DEMO_DIR]      # default: data/demo

Reads DEMO_DIR/train.jsonl and eval.jsonl (scripts/make_demo_data.py) and writes pairs.jsonl and
eval_pairs.jsonl beside them, in TRL's preference layout (prompt / chosen / rejected + images).
The rejected answer changes only what the question asks about: another colour for a colour
question, another shape for a shape question, the other shape's colour for "Which one is first?".
Deterministic: tests regenerate the files and compare them with the committed ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLORS = ("red", "green", "blue", "yellow")  # the order of scripts/make_demo_data.py
SHAPES = ("circle", "square", "triangle")


def swap(text: str, words: tuple[str, ...], avoid: str | None = None) -> str:
    """``text`` with its first word from ``words`` replaced by the next one (never ``avoid``)."""
    for word in text.replace(".", " ").split():
        if word in words:
            others = [w for w in words[words.index(word) + 1 :] + words if w not in (word, avoid)]
            return text.replace(word, others[0], 1)
    raise ValueError(f"no word of {words} in {text!r}")


def wrong_answer(messages: list[dict]) -> str:
    question = messages[-2]["content"][-1]["text"]
    answer = messages[-1]["content"][0]["text"]
    if question.startswith("What color"):
        return swap(answer, COLORS)
    if question.startswith("What shape"):
        return swap(answer, SHAPES)
    # "Which one is first?" after "The first is X and the second is Y.": the rejected answer names Y.
    first_answer = messages[1]["content"][0]["text"]
    second = [w for w in first_answer.rstrip(".").split() if w in COLORS][-1]
    return answer.replace([w for w in answer.rstrip(".").split() if w in COLORS][0], second)


def to_pair(row: dict) -> dict:
    """One SFT sample as TRL's preference layout: bare image parts, the sources in `images`."""
    messages = row["messages"]
    images, prompt = [], []
    for message in messages[:-1]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                images.append(part["image"])
                parts.append({"type": "image"})
            else:
                parts.append(part)
        prompt.append({"role": message["role"], "content": parts})
    chosen = messages[-1]["content"][0]["text"]
    return {
        "images": images,
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": chosen}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong_answer(messages)}]}],
    }


def write(demo: Path) -> None:
    for source, target in (("train.jsonl", "pairs.jsonl"), ("eval.jsonl", "eval_pairs.jsonl")):
        rows = [json.loads(line) for line in (demo / source).read_text(encoding="utf-8").splitlines()]
        with (demo / target).open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(to_pair(row)) + "\n")


if __name__ == "__main__":
    target = (
        Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "data" / "demo"
    )
    write(target)
    print(f"demo pairs written to {target}")
