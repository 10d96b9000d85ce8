"""The stages of a run: load, lora, then the train stage's objective (sft, ...).

An objective module exposes ``train(model, processor, family, data, train, options, *, run,
device, dtype, resume, callbacks) -> TrainResult``; ``options`` is the recipe section named after
the objective (None when it has no knobs); ``resume`` is the complete checkpoint folder to continue
from (None: from step 0), chosen by vlmtune.resuming.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainResult:
    """What the train stage hands back to the pipeline (summary.json figures, the output folder)."""

    first_loss: float | None
    last_loss: float | None
    steps: int
    output: str
