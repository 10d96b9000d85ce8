"""Fabricated run folders in every state, as `vlmtune train` leaves them (for runs / report tests)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

import yaml

from vlmtune.runs import rundir

T0 = datetime(2026, 11, 20, 9, 0, 0)
MiB = 2**20


def rows(losses: list[float], start: int = 1, rss: int | None = None, **extra) -> list[dict]:
    """Training rows as MetricsWriter writes them: step, loss, lr, grad norm, accuracy, memory."""
    out = []
    for i, loss in enumerate(losses):
        step = start + i
        row = {"step": step, "loss": loss, "grad_norm": 1.0 + step / 10, "learning_rate": 1e-3 / step,
               "token_accuracy": min(1.0, step / 20), "epoch": step / 10, **extra}  # fmt: skip
        if rss is not None:
            row["peak_rss_since_start_bytes"] = rss + step * MiB
        out.append(row)
    return out


def make_run(
    root: Path,
    name: str,
    status: str,
    minutes_after_t0: int,
    metrics: list[dict],
    *,
    model: str = "tiny:qwen2_vl",
    objective: str = "sft",
    train: dict | None = None,
    top: dict | None = None,
    partial_line: str | None = None,
) -> Path:
    """A run folder with summary.json, resolved.yaml and 3-train/metrics.jsonl.

    ``train`` is the train stage's entry (status, figures); stages before it are done.
    """
    path = root / name
    (path / "3-train").mkdir(parents=True)
    created = T0 + timedelta(minutes=minutes_after_t0)
    start = created.timestamp()
    stages = {
        "load": {"status": "done", "started": start, "seconds": 2.0, rundir.RSS_BEFORE_LOAD: 400 * MiB},
        "lora": {"status": "done", "started": start + 2, "seconds": 1.0},
        "train": {"started": start + 3, **(train or {"status": "running"})},
    }
    summary = {"recipe": name, "status": status, "created": created.isoformat(timespec="seconds"),
               "stages": stages, **(top or {})}  # fmt: skip
    (path / rundir.SUMMARY).write_text(json.dumps(summary))
    resolved = {"model": {"name": model, "dtype": "bfloat16"}, "train": {"objective": objective}}
    (path / rundir.RESOLVED).write_text(yaml.safe_dump(resolved))
    lines = [json.dumps(row) for row in metrics]
    text = "".join(line + "\n" for line in lines) + (partial_line or "")
    (path / rundir.METRICS).write_text(text)
    return path


def runs_in_every_state(root: Path) -> dict[str, Path]:
    """finished, failed, interrupted, running (with a half-written last line), and broken folders."""
    root.mkdir(parents=True, exist_ok=True)
    finished = make_run(
        root, "finished", "done", 0, rows([2.0, 1.5, 1.0], rss=900 * MiB),
        train={"status": "done", "seconds": 30.0, "first_loss": 2.0, "last_loss": 1.0, "steps": 3,
               rundir.MEASURED_MEMORY: {"device": "cpu", "peak_bytes": 903 * MiB, "baseline_bytes": 400 * MiB,
                                         "estimated_bytes": 500 * MiB, "ratio": 1.006}},
        top={"seconds": 35.5, "output": "x"},
    )  # fmt: skip
    failed = make_run(
        root,
        "failed",
        "failed",
        10,
        rows([3.0, float("nan")], rss=800 * MiB),
        train={"status": "failed", "seconds": 12.0, "error": "loss is nan"},
    )
    interrupted = make_run(
        root, "interrupted", "interrupted", 20, rows([4.0, 3.5, 3.25, 3.0], rss=700 * MiB),
        train={"status": "interrupted", "seconds": 60.0}, objective="dpo", model="Qwen/Qwen2-VL-2B-Instruct",
    )  # fmt: skip
    running = make_run(
        root, "running", "running", 30, rows([5.0, 4.0], rss=600 * MiB) + [{"step": 2, "eval_loss": 4.5}],
        partial_line='{"step": 3, "loss": 3.',
    )  # fmt: skip
    # A run still loading its model: no metrics yet.
    nothing_yet = make_run(root, "just-started", "running", 40, [])
    broken = root / "broken"
    broken.mkdir()
    (broken / rundir.SUMMARY).write_text("{not json")
    (root / "not-a-run").mkdir()  # no summary.json: not listed
    # The running run started 100 s ago: its duration is counted up to now.
    summary = json.loads((running / rundir.SUMMARY).read_text())
    for offset, stage in enumerate(summary["stages"].values()):
        stage["started"] = time.time() - 100 + offset
    (running / rundir.SUMMARY).write_text(json.dumps(summary))
    return {"finished": finished, "failed": failed, "interrupted": interrupted, "running": running,
            "just-started": nothing_yet, "broken": broken}  # fmt: skip
