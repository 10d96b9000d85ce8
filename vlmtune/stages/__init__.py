"""The stages of a run: load, lora, then the train stage's objective (sft, grpo, ...).

An objective module exposes ``train(model, processor, family, data, train, options, *, run,
device, dtype, resume, callbacks, report_to) -> TrainResult``; ``options`` is the recipe section
named after the objective (None when it has no knobs); ``resume`` is the complete checkpoint folder
to continue from (None: from step 0), chosen by vlmtune.runs.resuming; ``report_to`` (output.report_to)
goes to the trainer's arguments, and ``vlmtune.observe.attach(trainer, run, device)`` hooks the
measured memory and the trackers' folders into the built trainer. The trainer class mixes in
vlmtune.training.reliable_trainer.ReliableTrainerMixin (exact resume, complete checkpoints, the NaN guard).
It may also expose ``before_load(options)``: checks that must pass before any weight loads (grpo
imports its reward functions there).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainResult:
    """What the train stage hands back to the pipeline (summary.json figures, the output folder)."""

    first_loss: float | None
    last_loss: float | None
    steps: int
    output: str
    figures: dict = field(default_factory=dict)  # the objective's own headline figures (grpo: rewards)
