"""What `vlmtune train --resume RUN` does with a run folder: nothing when it is finished, only the
eval when training finished, else training from the newest complete checkpoint; and which recipe
changes a resume accepts.

A resume continues the run it was started as. Changing the model, the LoRA shape, the data or the
optimisation in mid-run would make the checkpoint's state meaningless (or fail on a size mismatch
deep in the Trainer), so only the keys in ``CHANGEABLE`` may differ, from `--set` or from a hand
edit of resolved.yaml; any other difference is refused, naming the keys. The data files themselves
must be as they were when the run started (vlmtune.runs.fingerprints).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import RecipeError
from vlmtune.recipe import Recipe, load_recipe
from vlmtune.runs import fingerprints, rundir, trainer_checkpoints
from vlmtune.runs.rundir import RunDir
from vlmtune.runs.trainer_checkpoints import Checkpoint, CheckpointError, Skipped

# How long, how often it saves, evaluates and logs, what it keeps, and whether it evaluates at the
# end: the run so far stays valid under any of these.
CHANGEABLE = (
    "train.max_steps",
    "train.epochs",
    "train.save_steps",
    "train.eval_steps",
    "train.logging_steps",
    "train.save_total_limit",
    "train.eval_generate",
    "train.num_workers",
    "train.divergence_checks",
)


class NothingToResume(Exception):
    """The run finished: a resume has nothing to do (the CLI says so and exits 0)."""

    def __init__(self, run: RunDir, steps: int | None):
        super().__init__(f"run {run.path} is finished")
        self.run = run
        self.steps = steps


@dataclass
class Start:
    """Where the stages start: from scratch, from a checkpoint, or after training (eval only)."""

    checkpoint: Checkpoint | None = None
    train_done: bool = False
    skipped: list[Skipped] = field(default_factory=list)
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # key -> (before, now)

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint else 0


def refuse_if_finished(run: RunDir, overrides: list[str]) -> None:
    """NothingToResume for a finished run; a RecipeError when --set asks to change one."""
    summary = run.summary()
    if summary.get("status") != "done":
        return
    if overrides:
        raise RecipeError(
            f"run {run.path} is finished; a finished run is never changed, so --set {' '.join(overrides)} "
            "cannot apply",
            hint="start a new run with those settings: vlmtune train RECIPE --set ...",
        )
    raise NothingToResume(run, summary.get("stages", {}).get("train", {}).get("steps"))


def plan(run: RunDir, overrides: list[str]) -> tuple[Recipe, Start]:
    """The recipe to continue with and where to start; every refusal raises before anything changes."""
    summary = run.summary()
    as_written = load_recipe(run / rundir.RESOLVED)
    recipe = load_recipe(run / rundir.RESOLVED, overrides) if overrides else as_written
    started = summary.get("resolved")  # absent in runs started before vlmtune kept it
    edits = differences(started, baseline(as_written)) if started is not None else {}
    _refuse_changes(
        edits,
        f"{run / rundir.RESOLVED} was edited since the run started, and a resume cannot change",
        "undo those edits (the values the run started with are shown first)",
    )
    set_changes = differences(baseline(as_written), baseline(recipe))
    _refuse_changes(
        set_changes,
        "--resume cannot change",
        "start a new run for those: vlmtune train RECIPE --set KEY=VALUE",
    )
    changes = {**edits, **set_changes}
    fingerprints.refuse_changed(summary.get("data_fingerprints"), recipe.data, run.path)
    train_done = summary.get("stages", {}).get("train", {}).get("status") == "done"
    if train_done:
        if changes:
            raise RecipeError(
                f"run {run.path} finished training (only its eval is left), so "
                f"{', '.join(changes)} can no longer change it",
                hint="resume without --set to run the eval, or start a new run",
            )
        return recipe, Start(train_done=True)
    choice = trainer_checkpoints.choose(run / rundir.CHECKPOINTS)
    _refuse_when_only_damaged(run, choice)
    if choice.chosen and 0 < recipe.train.max_steps < choice.chosen.step:
        raise RecipeError(
            f"train.max_steps {recipe.train.max_steps} is below the step of the checkpoint a resume "
            f"starts from ({choice.chosen.path.name})",
            hint=f"give train.max_steps of at least {choice.chosen.step}",
        )
    return recipe, Start(choice.chosen, skipped=choice.skipped, changes=changes)


def record(run: RunDir, recipe: Recipe, start: Start) -> None:
    """resolved.yaml with the accepted changes; summary.json: running again, and this resume's facts."""
    if start.changes:
        run.write_text(rundir.RESOLVED, recipe.to_yaml())
    summary = run.summary()
    resumes = [
        *summary.get("resumes", []),
        {
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "from_step": start.step,
            "from_checkpoint": start.checkpoint.path.name if start.checkpoint else None,
            "eval_only": start.train_done,
            "skipped": {s.path.name: s.reason for s in start.skipped},
            "changes": {key: {"before": old, "now": new} for key, (old, new) in start.changes.items()},
        },
    ]
    run.set_status("running", resumes=resumes, resolved=baseline(recipe))


def describe(run: RunDir, start: Start) -> str:
    if start.train_done:
        return f"resuming {run.path}: training finished; running the eval that was left"
    if start.checkpoint is None:
        return f"resuming {run.path}: no complete checkpoint, so training starts again from step 0"
    return f"resuming {run.path} from {start.checkpoint.path.name} (step {start.step})"


def _refuse_when_only_damaged(run: RunDir, choice: trainer_checkpoints.Choice) -> None:
    """Partial saves are garbage and restart from step 0; damaged complete ones are work lost, so the
    user decides."""
    damaged = [s for s in choice.skipped if s.damaged]
    if choice.chosen is None and damaged:
        raise CheckpointError(
            f"run {run.path} has no usable checkpoint: "
            + "; ".join(f"{s.path.name}: {s.reason}" for s in choice.skipped),
            hint="restore the damaged file from a copy of the run folder; or delete those checkpoint folders "
            "to train again from step 0",
        )


def _refuse_changes(changes: dict[str, tuple[Any, Any]], what: str, hint: str) -> None:
    refused = {key: change for key, change in changes.items() if key not in CHANGEABLE}
    if refused:
        raise RecipeError(
            f"{what} {', '.join(refused)}: a resumed run continues the recipe it was started with",
            [f"{key}: {old!r} -> {new!r}" for key, (old, new) in refused.items()],
            hint=f"{hint}; a resume may change only {', '.join(CHANGEABLE)}",
        )


def differences(before: dict, after: dict) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two recipe dicts, with (before, after)."""
    flat_before, flat_after = _flatten(before), _flatten(after)
    return {
        key: (flat_before.get(key), flat_after.get(key))
        for key in sorted(flat_before.keys() | flat_after.keys())
        if flat_before.get(key) != flat_after.get(key)
    }


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value and prefix == "":  # sections; values inside stay whole
            flat.update(_flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def baseline(recipe: Recipe) -> dict:
    """The recipe as summary.json keeps it: what later edits of resolved.yaml are compared with."""
    return recipe.model_dump(mode="json")
