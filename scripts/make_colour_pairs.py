#!/usr/bin/env python3
"""Write the colour set's preference pairs: the right colour word chosen, the next colour rejected.

    python scripts/make_colour_pairs.py [COLOURS_DIR]      # default: data/colours

Reads COLOURS_DIR/train.jsonl and eval.jsonl (scripts/make_colour_data.py) and writes pairs.jsonl
and eval_pairs.jsonl beside them, in TRL's preference layout (prompt / chosen / rejected + images),
for the DPO worked example (recipes/colours_dpo.yaml, docs/preference.md). Deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLOURS = ("red", "green", "blue", "yellow")


def pair(record: dict) -> dict:
    user, answer = record["messages"][0], record["messages"][1]["content"]
    image = next(part["image"] for part in user["content"] if part["type"] == "image")
    question = next(part["text"] for part in user["content"] if part["type"] == "text")
    wrong = COLOURS[(COLOURS.index(answer) + 1) % len(COLOURS)]
    return {
        "images": [image],
        "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        "chosen": [{"role": "assistant", "content": [{"type": "text", "text": answer}]}],
        "rejected": [{"role": "assistant", "content": [{"type": "text", "text": wrong}]}],
    }


def main(folder: Path) -> None:
    for source, target in (("train.jsonl", "pairs.jsonl"), ("eval.jsonl", "eval_pairs.jsonl")):
        rows = [
            json.loads(line) for line in (folder / source).read_text(encoding="utf-8").splitlines() if line
        ]
        (folder / target).write_text("".join(json.dumps(pair(r)) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {folder / target}: {len(rows)} pairs")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "data" / "colours"
    )
