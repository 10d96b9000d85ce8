"""The run folders under a directory, each read into one record: `vlmtune runs`.

A listing must never stop at one broken folder: every file is read defensively, and a folder whose
summary.json cannot be read is listed as "unreadable" rather than raising.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from vlmtune.observe import memory
from vlmtune.observe.metrics import finite_or_none, number, read_rows
from vlmtune.runs import rundir

UNREADABLE = "unreadable"  # the status of a folder whose summary.json does not parse


@dataclass(frozen=True)
class RunInfo:
    """One run folder, as `vlmtune runs --json` prints it (stable keys; null when not known)."""

    name: str
    path: str
    model: str | None
    objective: str | None
    status: str
    created: str | None  # ISO time the run folder was made
    steps: int | None  # the last logged step (the trainer's global step)
    first_loss: float | None
    last_loss: float | None  # null when not finite (a diverged run)
    peak_memory_bytes: int | None  # CUDA: peak reserved; CPU: peak RSS of the process
    seconds: float | None  # from the first stage's start to the last one's end (or now, while running)
    eval_metric: str | None = None  # what eval_score is: exact_match, preference_accuracy, eval_reward, ...
    eval_score: float | None = None  # the eval stage's score, else the last held-out figure logged

    def to_json(self) -> dict:
        data = asdict(self)
        data["first_loss"], data["last_loss"] = (
            finite_or_none(self.first_loss),
            finite_or_none(self.last_loss),
        )
        return data

    @property
    def title(self) -> str:
        details = ", ".join(x for x in (self.model, self.objective) if x)
        return f"{self.name} ({details})" if details else self.name


def find_runs(root: Path) -> list[RunInfo]:
    """``root`` itself when it is a run folder, else the run folders directly inside it; newest first."""
    root = Path(root)
    if (root / rundir.SUMMARY).is_file():
        folders = [root]
    else:
        folders = [p for p in root.iterdir() if p.is_dir() and (p / rundir.SUMMARY).is_file()]
    return sorted(
        (read_run(p) for p in folders), key=lambda info: (_started_at(info), info.name), reverse=True
    )


def read_run(path: Path) -> RunInfo:
    path = Path(path)
    summary = _json(path / rundir.SUMMARY)
    model, objective = _model_and_objective(path)
    rows = read_rows(path)
    losses = [v for v in (number(row.get("loss")) for row in rows) if v is not None]
    if summary is None:
        return RunInfo(path.name, str(path), model, objective, UNREADABLE, None,
                       _last_step(rows), *_ends(losses), None, None)  # fmt: skip
    stages = summary.get("stages") or {}
    trained = stages.get("train") or {}
    # A finished run's figure; while it runs (or after a crash), the rows say as much.
    measured = trained.get(rundir.MEASURED_MEMORY) or memory.measured_peak(rows, None, None)
    return RunInfo(
        name=path.name,
        path=str(path),
        model=model,
        objective=objective,
        status=str(summary.get("status", UNREADABLE)),
        created=summary.get("created"),
        steps=trained["steps"] if isinstance(trained.get("steps"), int) else _last_step(rows),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        peak_memory_bytes=measured.get("peak_bytes"),
        seconds=_duration(summary),
        **_eval_score(stages.get("eval") or {}, rows),
    )


# The held-out figure a run is judged by: the eval stage's scores first, else the last one logged.
EVAL_STAGE_KEYS = ("preference_accuracy", "exact_match")
EVAL_ROW_KEYS = ("eval_reward", "eval_preference_accuracy", "eval_token_accuracy")


def _eval_score(stage: dict, rows: list[dict]) -> dict:
    for key in EVAL_STAGE_KEYS:
        if isinstance(stage.get(key), (int, float)):
            return {"eval_metric": key, "eval_score": float(stage[key])}
    for key in EVAL_ROW_KEYS:
        values = [v for v in (number(row.get(key)) for row in rows) if v is not None]
        if values:
            return {"eval_metric": key, "eval_score": finite_or_none(values[-1])}
    return {}


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _model_and_objective(path: Path) -> tuple[str | None, str | None]:
    """From resolved.yaml (every key written out), without validating it: old runs must still list."""
    import yaml

    try:
        resolved = yaml.safe_load((path / rundir.RESOLVED).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None, None
    if not isinstance(resolved, dict):
        return None, None
    model, train = resolved.get("model"), resolved.get("train")
    return (
        model.get("name") if isinstance(model, dict) else None,
        train.get("objective") if isinstance(train, dict) else None,
    )


def _last_step(rows: list[dict]) -> int | None:
    return max(row["step"] for row in rows) if rows else None


def _ends(losses: list[float]) -> tuple[float | None, float | None]:
    return (losses[0], losses[-1]) if losses else (None, None)


def _duration(summary: dict) -> float | None:
    if isinstance(summary.get("seconds"), (int, float)):
        return float(summary["seconds"])
    stages = [s for s in (summary.get("stages") or {}).values() if isinstance(s, dict) and "started" in s]
    if not stages:
        return None
    start = min(s["started"] for s in stages)
    if summary.get("status") == "running":
        return round(time.time() - start, 1)
    ends = [s["started"] + s["seconds"] for s in stages if isinstance(s.get("seconds"), (int, float))]
    return round(max(ends) - start, 1) if ends else None


def _started_at(info: RunInfo) -> float:
    """When the run started: summary.json's `created`, else the folder's modification time."""
    try:
        return datetime.fromisoformat(info.created).timestamp()
    except (TypeError, ValueError):
        return Path(info.path).stat().st_mtime


def human_seconds(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else (f"{minutes}m{secs:02d}s" if minutes else f"{secs}s")
