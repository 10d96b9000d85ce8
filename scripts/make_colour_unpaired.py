#!/usr/bin/env python3
"""Write the colour set's unpaired answers for KTO: every picture once with its right colour word
(label true) and once with the next colour (label false).

    python scripts/make_colour_unpaired.py [COLOURS_DIR]      # default: data/colours

Reads COLOURS_DIR/pairs.jsonl and eval_pairs.jsonl (scripts/make_colour_pairs.py) and writes
unpaired.jsonl and eval_unpaired.jsonl beside them, in TRL's unpaired preference layout (prompt /
completion / label + images), for the KTO worked example (recipes/kto/colours_kto.yaml,
docs/preference.md). Deterministic.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def unpaired(pair: dict) -> list[dict]:
    common = {"images": pair["images"], "prompt": pair["prompt"]}
    return [
        {**common, "completion": pair["chosen"], "label": True},
        {**common, "completion": pair["rejected"], "label": False},
    ]


def main(folder: Path) -> None:
    for source, target in (("pairs.jsonl", "unpaired.jsonl"), ("eval_pairs.jsonl", "eval_unpaired.jsonl")):
        pairs = [
            json.loads(line) for line in (folder / source).read_text(encoding="utf-8").splitlines() if line
        ]
        rows = [row for pair in pairs for row in unpaired(pair)]
        (folder / target).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        print(f"wrote {folder / target}: {len(rows)} answers ({len(pairs)} good, {len(pairs)} bad)")


if __name__ == "__main__":
    main(
        Path(sys.argv[1])
        if len(sys.argv) > 1
        else Path(__file__).resolve().parent.parent / "data" / "colours"
    )
