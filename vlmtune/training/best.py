"""The best checkpoint and early stopping: train.best_metric watched in every logged eval row.

The metric is read from the rows the trainer logs (eval_loss and the objectives' eval metrics at
train.eval_steps, the answer metrics at train.eval_generate_steps), under metrics.jsonl's names. Each
checkpoint's completion marker records the value measured at its step (ReliableTrainerMixin), so
rotation can keep the best checkpoint beside the newest ones and a resume finds it again; with
train.early_stopping_patience, N measurements in a row without improvement stop the run and say why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlmtune.recipe import TrainSection
from vlmtune.runs import rundir, trainer_checkpoints
from vlmtune.scoring import greater_is_better
from vlmtune.training.callbacks import stable_row


class BestTracker(TrainerCallback):
    """Watches ``key`` (a metrics.jsonl name, e.g. eval_rouge_l) in the logged rows."""

    def __init__(self, key: str, greater: bool, patience: int | None = None):
        self.key = key
        self.greater = greater
        self.patience = patience
        self.measured: dict[int, float] = {}  # step -> value
        self.best: tuple[int, float] | None = None
        self.since_best = 0  # measurements in a row without improvement
        self.stopped: str | None = None  # why training stopped early

    @classmethod
    def from_section(cls, train: TrainSection) -> BestTracker | None:
        if train.best_metric is None:
            return None
        key = f"eval_{train.best_metric}"
        greater = train.greater_is_better if train.greater_is_better is not None else greater_is_better(key)
        return cls(key, greater, train.early_stopping_patience)

    def better(self, value: float, than: float) -> bool:
        return value > than if self.greater else value < than

    def observe(self, step: int, value: float) -> bool:
        """Record a measurement; True when training should stop (patience used up)."""
        self.measured[step] = value
        if self.best is None or self.better(value, self.best[1]):
            self.best, self.since_best = (step, value), 0
            return False
        self.since_best += 1
        if self.patience and self.since_best >= self.patience:
            self.stopped = (
                f"{self.key} has not improved for {self.since_best} measurements (best {self.best[1]:.4g} at step "
                f"{self.best[0]}; train.early_stopping_patience {self.patience})"
            )
            return True
        return False

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        value = stable_row(logs or {}).get(self.key)
        if isinstance(value, int | float) and self.observe(state.global_step, float(value)):
            control.should_training_stop = True

    def restore(self, checkpoints: Path, up_to: int) -> None:
        """A resume: the measurements up to its checkpoint's step replayed in order, from metrics.jsonl (the
        pipeline has kept its rows up to that step), so the best and the patience count on as if never
        stopped; from the kept checkpoints' markers when that file cannot be read."""
        run = checkpoints.parents[len(Path(rundir.CHECKPOINTS).parts) - 1]
        found = _logged(run / rundir.METRICS, self.key, up_to)
        if found is None:
            found = [
                (c.step, value)
                for c in trainer_checkpoints.all_checkpoints(checkpoints)
                if c.step <= up_to and (value := trainer_checkpoints.metric_of(c.path, self.key)) is not None
            ]
        for step, value in found:
            self.observe(step, value)

    def marker(self, step: int) -> dict:
        """What a checkpoint saved at ``step`` records: the value measured there, if any."""
        return {"metrics": {self.key: self.measured[step]}} if step in self.measured else {}

    def figures(self, run_path: Path, checkpoints: Path) -> dict:
        """summary.json's train figures: the best checkpoint kept, and why training stopped early."""
        out: dict[str, Any] = {}
        best = trainer_checkpoints.best(checkpoints, self.key, self.greater)
        if best is not None:
            out["best_checkpoint"] = {
                "path": best.path.relative_to(run_path).as_posix(),
                "step": best.step,
                "metric": self.key,
                "value": trainer_checkpoints.metric_of(best.path, self.key),
                "greater_is_better": self.greater,
            }
        if self.stopped:
            out["stopped_early"] = self.stopped
        return out


def _logged(metrics: Path, key: str, up_to: int) -> list[tuple[int, float]] | None:
    """(step, value) of ``key`` in metrics.jsonl rows up to ``up_to``; None when the file cannot be read."""
    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    found = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill: the resume drops it too
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, int | float) and isinstance(row.get("step"), int) and row["step"] <= up_to:
            found.append((row["step"], float(value)))
    return found
