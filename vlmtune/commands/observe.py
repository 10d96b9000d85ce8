"""runs, report, and the observations printed at the end of `train`. Heavy imports stay inside.

The logic lives in vlmtune/observe/; this module only renders it.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(highlight=False)

STATUS_STYLE = {
    "done": "green",
    "running": "cyan",
    "failed": "red",
    "interrupted": "yellow",
    "damaged": "red",
}


def runs(
    folder: Path = typer.Argument(
        Path("runs"), help="A folder of run folders (a recipe's output.dir), or one run folder."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print a JSON list with stable keys instead of a table."
    ),
) -> None:
    """List the run folders in FOLDER, newest first: model, objective, status, steps, loss, memory, time.

    Examples:

        vlmtune runs

        vlmtune runs experiments/ --json
    """
    from vlmtune.errors import RunDirError
    from vlmtune.observe.runs import find_runs

    if not folder.is_dir():
        raise RunDirError(
            f"{folder} is not a folder",
            hint="pass the folder that holds run folders (the recipe's output.dir, `runs` by default)",
        )
    found = find_runs(folder)
    if as_json:
        print(json.dumps([info.to_json() for info in found], indent=2, allow_nan=False))
        return
    if not found:
        console.print(f"no run folders in {folder}")
        return
    console.print(runs_table(found))


WIDE = 120  # columns from which every figure gets its own column; narrower, a run takes two lines
EVAL_LABELS = {"exact_match": "exact", "preference_accuracy": "pref", "eval_reward": "reward",
               "eval_preference_accuracy": "pref", "eval_token_accuracy": "tok acc"}  # fmt: skip


def runs_table(found: list, width: int | None = None):
    """Every run on one line in a wide terminal; in a narrow one (80 columns) the model, objective,
    memory and time go on a second line under the run's name, so nothing is dropped or cut."""
    from vlmtune.observe.runs import human_seconds
    from vlmtune.units import human_bytes

    if (width or console.width) < WIDE:
        return _runs_lines(found)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("run", "model", "objective", "status", "steps", "loss", "eval", "peak memory", "time"):
        right = column in ("steps", "peak memory", "time", "eval")
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for info in found:
        table.add_row(
            info.name, info.model or "-", info.objective or "-",
            Text(info.status, style=STATUS_STYLE.get(info.status, "")),
            "-" if info.steps is None else str(info.steps), _loss(info.first_loss, info.last_loss), _eval(info),
            "-" if info.peak_memory_bytes is None else human_bytes(info.peak_memory_bytes),
            human_seconds(info.seconds),
        )  # fmt: skip
    return table


def _runs_lines(found: list):
    """Two lines a run: name, status, steps, loss, eval; then model, objective, memory, time (dim)."""
    from rich.console import Group

    from vlmtune.observe.runs import human_seconds
    from vlmtune.units import human_bytes

    name_width = max(len(info.name) for info in found)
    status_width = max(len(info.status) for info in found)
    steps_width = max(len(str(info.steps)) for info in found)
    lines = []
    for info in found:
        steps = "-" if info.steps is None else str(info.steps)
        first = Text.assemble(
            (f"{info.name:<{name_width}}  ", "bold"),
            (f"{info.status:<{status_width}}", STATUS_STYLE.get(info.status, "")),
            f"  {steps:>{steps_width}} steps  loss {_loss(info.first_loss, info.last_loss)}",
        )  # fmt: skip
        evaluated = [_eval(info)] if info.eval_score is not None else []
        if evaluated and len(first) + 2 + len(evaluated[0]) <= console.width:
            first.append(f"  {evaluated.pop()}")
        lines.append(first)
        memory = "-" if info.peak_memory_bytes is None else human_bytes(info.peak_memory_bytes)
        details = [
            *evaluated,
            info.model or "-",
            info.objective or "-",
            f"peak {memory}",
            human_seconds(info.seconds),
        ]
        lines.append(Text("    " + ", ".join(details), style="dim"))
    return Group(*lines)


def _eval(info) -> str:
    if info.eval_score is None:
        return "-"
    return f"{EVAL_LABELS.get(info.eval_metric, info.eval_metric)} {info.eval_score:.3f}"


def _loss(first: float | None, last: float | None) -> str:
    if first is None:
        return "-"
    return f"{first:.3f} -> {last:.3f}"


def report(
    run_dir: Path = typer.Argument(..., help="A run folder, finished or not.", show_default=False),
    out: Path = typer.Option(
        None,
        "--out",
        help="Write the picture to this new file instead of the run folder's 3-train/curves.png.",
    ),
    force: bool = typer.Option(False, "--force", help="Let --out replace an existing PNG picture."),
) -> None:
    """Draw a run's curves (loss, learning rate, grad norm, token accuracy) to a PNG and summarise them.

    Works on a run in progress, interrupted or failed. A finished run's picture, drawn when its
    training ended, is left as it is (use --out for a fresh copy).

    Examples:

        vlmtune report runs/demo-20261123-101500

        vlmtune report runs/demo-20261123-101500 --out loss.png
    """
    from vlmtune.observe import curves, memory
    from vlmtune.observe.metrics import read_rows
    from vlmtune.observe.runs import human_seconds, read_run
    from vlmtune.runs import rundir
    from vlmtune.runs.rundir import RunDir

    run = RunDir.open(run_dir)
    if out is not None:
        curves.check_picture_target(out, replace=force)
    info = read_run(run.path)
    steps = "no steps" if info.steps is None else f"{info.steps} steps"
    console.print(
        Text.assemble(
            (info.title, "bold"),
            ": ",
            (info.status, STATUS_STYLE.get(info.status, "")),
            f", {steps} in {human_seconds(info.seconds)}",
        )  # fmt: skip
    )
    if info.problem:
        console.print(f"damaged:    {info.problem}", markup=False, soft_wrap=True)
    rows = read_rows(run.path)
    if not rows:
        console.print("no training metrics logged yet: nothing to draw")
        return
    drawn = curves.extract(rows)
    print_curves(drawn)
    measured = recorded_memory(run) or _rows_memory(run, rows)  # a finished run's figure, else the rows
    if measured:
        console.print(f"memory:     {memory.describe(measured)}", markup=False, soft_wrap=True)
    target = out or run / rundir.CURVES
    if out is None and info.status == "done" and target.is_file():
        console.print(f"curves:     {target} (drawn when training ended)", markup=False, soft_wrap=True)
        return
    curves.write_png(drawn, target, info.title)
    console.print(f"curves:     {target}", markup=False, soft_wrap=True)


def _rows_memory(run, rows: list) -> dict:
    from vlmtune.errors import RunDirError
    from vlmtune.observe import memory

    try:
        return memory.run_memory(run, rows)
    except (RunDirError, OSError, KeyError, TypeError, ValueError):  # a damaged estimate: no comparison
        return {}


def recorded_memory(run) -> dict:
    """The measured memory summary.json keeps for a finished run; {} when absent or damaged."""
    from vlmtune.errors import RunDirError
    from vlmtune.runs import rundir

    try:
        recorded = run.summary()["stages"]["train"][rundir.MEASURED_MEMORY]
    except (RunDirError, OSError, KeyError, TypeError):
        return {}
    return recorded if isinstance(recorded, dict) and isinstance(recorded.get("peak_bytes"), int) else {}


def print_curves(drawn: dict) -> None:
    from vlmtune.observe.curves import summary_lines

    for label, text in summary_lines(drawn):
        console.print(Text(f"  {label:<15}") + Text(text), soft_wrap=True)


def print_training_end(run) -> None:
    """After `train`'s done line: the curves in short, the measured memory, the picture's path."""
    from vlmtune.observe import curves, memory
    from vlmtune.observe.metrics import read_rows
    from vlmtune.runs import rundir

    print_curves(curves.extract(read_rows(run.path)))
    measured = run.summary()["stages"]["train"].get(rundir.MEASURED_MEMORY)
    if measured:
        console.print(f"memory:     {memory.describe(measured)}", markup=False, soft_wrap=True)
    if (run / rundir.CURVES).is_file():
        console.print(f"curves:     {run / rundir.CURVES}", markup=False, soft_wrap=True)
