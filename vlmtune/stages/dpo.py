"""Stage 3, dpo: pre-flight the preference pairs, then train with TRL's DPOTrainer and our collator.

Writes 3-train/data_report.json before the first step, metrics.jsonl as training logs (loss plus
reward_chosen, reward_rejected, reward_margin, preference_accuracy: see docs/preference.md), and
checkpoints/ plus the final adapter/ (or model/) at the end.

The reference the rewards are measured against is never a second full model for LoRA: a fresh
adapter is disabled (the base answers), an adapter continued from an earlier run (model.adapter)
is copied by TRL into a frozen "ref" adapter. Full fine-tuning gets a frozen copy of the model
(estimate-memory counts it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.data.preference import PairReader
from vlmtune.data.preference_collator import PreferenceCollator
from vlmtune.data.preflight import check_split
from vlmtune.model.families import Family
from vlmtune.recipe import DataSection, DpoSection, TrainSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.stages import TrainResult
from vlmtune.stages.common import (
    Selected,
    parallel_arguments,
    reference_trainer,
    run_trainer,
    select,
    trainer_arguments,
)


def prepare_pairs(
    processor: Any, family: Family, data: DataSection, train: TrainSection, run: RunDir
) -> tuple[PreferenceCollator, Selected, Selected | None]:
    """Pre-flight every split (both answers of every pair), write the data report, return the pairs."""
    collator = PreferenceCollator(processor, family, max_length=None)

    def check(name: str, source: str):
        return check_split(name, source, data, train.max_length, collator.count_tokens, reader=PairReader)

    reports = {"train": check("train", data.train)}
    if data.eval:
        reports["eval"] = check("eval", data.eval)
    run.write_json(rundir.DATA_REPORT, {name: report.to_json() for name, report in reports.items()})
    collator.max_length = train.max_length
    held_out = reports.get("eval")
    return (
        collator,
        select(reports["train"], data, train.seed),
        Selected(held_out.samples, held_out.lengths) if held_out else None,
    )


def dpo_config(
    train: TrainSection,
    options: DpoSection,
    run: RunDir,
    device: str,
    dtype: str,
    has_eval: bool,
    report_to: list[str] | None = None,
    parallel: dict | None = None,
) -> Any:
    """``parallel``: the launch's DDP arguments (stages.common.parallel_arguments)."""
    from trl import DPOConfig

    losses, weights = [options.loss_type], [1.0]
    if options.sft_weight:  # RPO: a supervised term on the chosen answers beside the preference loss
        losses.append("sft")
        weights.append(options.sft_weight)
    return DPOConfig(
        **trainer_arguments(train, run, device, dtype, has_eval, report_to or [], parallel),
        beta=options.beta,
        loss_type=losses,
        loss_weights=weights,
        label_smoothing=options.label_smoothing,
        max_length=None,  # our collator refuses what is too long; nothing is ever cut
    )


def preference_trainer_class() -> type:
    from trl import DPOTrainer

    from vlmtune.training.reliable_trainer import ReliableTrainerMixin

    class PreferenceTrainer(ReliableTrainerMixin, DPOTrainer):
        """DPOTrainer on vlmtune's pre-flighted pairs: our collator builds every batch from the pairs, so
        TRL neither tokenizes the dataset (its rows are positions) nor picks a collator of its own."""

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    return PreferenceTrainer


def train(
    model: Any,
    processor: Any,
    family: Family,
    data: DataSection,
    train_section: TrainSection,
    options: DpoSection,
    *,
    run: RunDir,
    device: str,
    dtype: str,
    resume: Path | None = None,
    callbacks: list | None = None,
    report_to: list[str] | None = None,
) -> TrainResult:
    trainer = build_trainer(
        model, processor, family, data, train_section, options, run=run, device=device, dtype=dtype,
        callbacks=callbacks, report_to=report_to,
    )  # fmt: skip
    return run_trainer(trainer, processor, run, device, resume, train_section, family)


def build_trainer(
    model: Any,
    processor: Any,
    family: Family,
    data: DataSection,
    train_section: TrainSection,
    options: DpoSection,
    *,
    run: RunDir,
    device: str,
    dtype: str,
    callbacks: list | None = None,
    report_to: list[str] | None = None,
) -> Any:
    """The pairs pre-flighted and TRL's DPOTrainer set up on them, with its reference, not yet trained."""
    collator, train_pairs, eval_pairs = prepare_pairs(processor, family, data, train_section, run)
    parallel = parallel_arguments(train_section, device, model, family)
    args = dpo_config(train_section, options, run, device, dtype, eval_pairs is not None, report_to, parallel)
    return reference_trainer(
        preference_trainer_class(), model, processor, args, collator, train_pairs, eval_pairs, run=run,
        train=train_section, reference=options.reference, dtype=dtype, callbacks=callbacks,
    )  # fmt: skip
