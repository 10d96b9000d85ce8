"""The run folders under a directory, each read into one record: `vlmtune runs`.

A listing must never stop at one broken folder: every file is read defensively (a value of the wrong
type is taken as unknown), and a folder whose summary.json cannot be read, or that fails to read in
any other way, is listed with the status "damaged" and the reason in ``problem``, rather than raising.
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

DAMAGED = "damaged"  # the status of a folder whose summary.json (or anything else) cannot be read


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
    problem: str | None = None  # a damaged folder: what could not be read
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
    """One folder's record; a folder that cannot be read any further is a record saying so, never a raise."""
    path = Path(path)
    try:
        return _read_run(path)
    except Exception as exc:  # noqa: BLE001 - one damaged folder must not hide the others
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        problem = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
        return RunInfo(path.name, str(path), None, None, DAMAGED, None, None, None, None, None, None, problem)


def _read_run(path: Path) -> RunInfo:
    summary = _json(path / rundir.SUMMARY)
    model, objective = _model_and_objective(path)
    rows = read_rows(path)
    losses = [v for v in (number(row.get("loss")) for row in rows) if v is not None]
    if summary is None:
        return RunInfo(path.name, str(path), model, objective, DAMAGED, None,
                       _last_step(rows), *_ends(losses), None, None,
                       f"{rundir.SUMMARY} cannot be read")  # fmt: skip
    stages = _mapping(summary.get("stages"))
    trained = _mapping(stages.get("train"))
    # A finished run's figure; while it runs (or after a crash), the rows say as much.
    measured = _mapping(trained.get(rundir.MEASURED_MEMORY)) or memory.measured_peak(rows, None, None)
    status = summary.get("status")
    return RunInfo(
        name=path.name,
        path=str(path),
        model=model,
        objective=objective,
        status=status if isinstance(status, str) else DAMAGED,
        created=summary.get("created") if isinstance(summary.get("created"), str) else None,
        steps=trained["steps"] if isinstance(trained.get("steps"), int) else _last_step(rows),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        peak_memory_bytes=measured.get("peak_bytes") if isinstance(measured.get("peak_bytes"), int) else None,
        seconds=_duration(summary),
        **_eval_score(stages.get("eval") or {}, rows),
        problem=None if isinstance(status, str) else "summary.json has no status",
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


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return data if isinstance(data, dict) else None


def _model_and_objective(path: Path) -> tuple[str | None, str | None]:
    """From resolved.yaml (every key written out), without validating it: old runs must still list."""
    import yaml

    try:
        resolved = yaml.safe_load((path / rundir.RESOLVED).read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return None, None
    if not isinstance(resolved, dict):
        return None, None
    name = _mapping(resolved.get("model")).get("name")
    objective = _mapping(resolved.get("train")).get("objective")
    return (name if isinstance(name, str) else None, objective if isinstance(objective, str) else None)


def _last_step(rows: list[dict]) -> int | None:
    return max(row["step"] for row in rows) if rows else None


def _ends(losses: list[float]) -> tuple[float | None, float | None]:
    return (losses[0], losses[-1]) if losses else (None, None)


def _duration(summary: dict) -> float | None:
    if isinstance(summary.get("seconds"), (int, float)):
        return float(summary["seconds"])
    stages = [
        s for s in _mapping(summary.get("stages")).values()
        if isinstance(s, dict) and number(s.get("started")) is not None
    ]  # fmt: skip
    if not stages:
        return None
    start = min(s["started"] for s in stages)
    if summary.get("status") == "running":
        return round(time.time() - start, 1)
    ends = [s["started"] + s["seconds"] for s in stages if number(s.get("seconds")) is not None]
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
