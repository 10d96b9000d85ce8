"""Reading metrics.jsonl while it may still be written: a run in progress appends to it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from vlmtune.runs import rundir


def read_rows(run_path: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, oldest first; [] when there is none yet.

    A reader can catch the trainer in the middle of appending a line: a last line that does not
    parse is that line, not yet finished, and is left out. A bad line anywhere else is kept out
    too rather than hiding every other row: each row stands alone.
    """
    path = Path(run_path) / rundir.METRICS
    try:
        text = path.read_text(encoding="utf-8", errors="replace")  # damaged bytes spoil their line only
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def number(value: object) -> float | None:
    """A logged value as a float, or None when it is not a number (bools, strings, lists)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def finite_or_none(value: float | None) -> float | None:
    """For strict JSON: NaN and infinities (a diverged loss) become null."""
    return value if value is not None and math.isfinite(value) else None
