"""See what a run did: measured memory, curves, the list of runs, trackers, and quiet output.

The modules stay apart (one concern each); this package's top level holds only the hooks the
pipeline and the objectives call, so that their files change by one line each:

- ``before_load()``: the load stage's figure, the process's RSS before the model loads;
- ``attach(trainer, run, device)``: the peak-memory sampler and the trackers' folders, on a built trainer;
- ``after_training(run, warn)``: the train stage's figures (measured memory) and the curves picture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vlmtune.observe import memory
from vlmtune.observe.metrics import read_rows
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir


def before_load() -> dict:
    """The load stage's figure: RSS before the model loads, the floor a CPU peak is compared above.

    The training libraries are imported first (training imports them a moment later anyway), so the
    floor holds their ~0.5 GB and the rest is what the run itself holds, as the estimate counts it.
    """
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers.trainer  # noqa: F401
    import trl  # noqa: F401

    rss = memory.current_rss()
    return {} if rss is None else {rundir.RSS_BEFORE_LOAD: rss}


def attach(trainer: Any, run: RunDir, device: str) -> None:
    """Hook the observers into a built trainer (any objective's: SFT, DPO, GRPO).

    The sampler goes first among the callbacks: it adds its keys to each log dict, and the callbacks
    after it (metrics.jsonl, TensorBoard, wandb, ...) then record them.
    """
    from vlmtune.observe import trackers
    from vlmtune.observe.sampler import PeakMemory

    trainer.callback_handler.callbacks.insert(0, PeakMemory(device))
    trackers.place_event_files(trainer, run)


def after_training(run: RunDir, warn: Callable[[str], None]) -> dict:
    """The train stage's figures (the measured peak beside the estimate); writes the curves picture.

    Drawing can never fail a run that trained: a failure is a warning and `vlmtune report` can retry.
    """
    from vlmtune.observe import curves, runs

    rows = read_rows(run.path)
    figures = curves.headline_means(rows)  # first/last-N means: one step of a noisy curve says little
    measured = memory.run_memory(run, rows)
    if measured:
        figures[rundir.MEASURED_MEMORY] = measured
    try:
        curves.write_png(curves.extract(rows), run / rundir.CURVES, runs.read_run(run.path).title)
    except Exception as exc:  # matplotlib missing or broken: the trained model is what matters
        warn(
            f"no curves picture ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"`vlmtune report {run.path}` draws it later"
        )
    return figures
