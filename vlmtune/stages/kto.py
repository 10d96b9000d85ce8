"""Stage 3, kto: pre-flight the unpaired answers (each with its good/bad label), then train with TRL's
KTOTrainer and our collator.

KTO (Ethayarajh et al., 2024) needs no pairs: each answer's reward (beta times its log-probability
ratio to the reference) is pushed above a baseline when the answer is good and below it when bad;
the baseline is the policy's KL divergence from the reference, estimated on the batch's prompts
answered with each other's answers (vlmtune.data.unpaired_collator).

Writes 3-train/data_report.json before the first step, metrics.jsonl as training logs (loss plus
reward_chosen and reward_rejected: the mean reward of the good and of the bad answers, reward_margin,
logp_chosen, logp_rejected, kl: see docs/preference.md), and checkpoints/ plus the final adapter/
(or model/) at the end. The reference is dpo's: a fresh adapter disabled, a continued adapter
frozen as TRL's "ref" copy (or disabled for kto.reference: base), a frozen copy for full fine-tuning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.data.preflight import check_split
from vlmtune.data.unpaired import UnpairedReader
from vlmtune.data.unpaired_collator import UnpairedCollator
from vlmtune.model.families import Family
from vlmtune.recipe import DataSection, KtoSection, TrainSection
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


def prepare_answers(
    processor: Any, family: Family, data: DataSection, train: TrainSection, options: KtoSection, run: RunDir
) -> tuple[UnpairedCollator, Selected, Selected | None]:
    """Pre-flight every split, write the data report (with the good/bad counts), return the answers."""
    collator = UnpairedCollator(processor, family, max_length=None, kl=options.loss_type == "kto")
    reader, measure = UnpairedReader, collator.token_counter()

    def check(name: str, source: str):
        return check_split(name, source, data, train.max_length, measure, reader=reader)

    reports = {"train": check("train", data.train)}
    if data.eval:
        reports["eval"] = check("eval", data.eval)
    run.write_json(
        rundir.DATA_REPORT,
        {name: {**report.to_json(), **label_counts(report.samples)} for name, report in reports.items()},
    )
    collator.max_length = train.max_length
    held_out = reports.get("eval")
    return (
        collator,
        select(reports["train"], data, train.seed),
        Selected(held_out.samples, held_out.lengths) if held_out else None,
    )


def label_counts(items: list) -> dict:
    """How many answers are good and bad: KTO's paper keeps their weighted ratio near 1 (kto.desirable_weight)."""
    good = sum(item.desirable for item in items)
    return {"desirable": good, "undesirable": len(items) - good}


def kto_config(
    train: TrainSection,
    options: KtoSection,
    run: RunDir,
    device: str,
    dtype: str,
    has_eval: bool,
    report_to: list[str] | None = None,
    parallel: dict | None = None,
) -> Any:
    """``parallel``: the launch's DDP arguments (stages.common.parallel_arguments). Its
    ``train_sampling_strategy`` is TRL's required sequential; ``vlmtune_sampling`` holds the run's own."""
    from trl import KTOConfig

    arguments = trainer_arguments(train, run, device, dtype, has_eval, report_to or [], parallel)
    ours = arguments["train_sampling_strategy"]
    arguments["train_sampling_strategy"] = "sequential"  # what KTOTrainer checks; the trainer puts ours back
    config = KTOConfig(
        **arguments,
        beta=options.beta,
        loss_type=options.loss_type,
        desirable_weight=options.desirable_weight,
        undesirable_weight=options.undesirable_weight,
        max_length=None,  # our collator refuses what is too long; nothing is ever cut
        pad_to_multiple_of=None,
    )
    config.vlmtune_sampling = ours
    return config


def kto_trainer_class() -> type:
    from trl import KTOTrainer

    from vlmtune.training.reliable_trainer import ReliableTrainerMixin

    class UnpairedTrainer(ReliableTrainerMixin, KTOTrainer):
        """KTOTrainer on vlmtune's pre-flighted answers: our collator builds every batch (with its KL
        sequences), so TRL neither tokenizes the dataset (its rows are positions) nor picks a collator.

        TRL insists on sequential sampling because its text path pairs each row with a neighbour's
        answer when it tokenizes the dataset; our collator pairs within the batch as it is drawn, so
        any order keeps the mismatch, and the run's own order (train.group_by_length, seeded per
        epoch by the mixin for an exact resume) is put back once TRL has checked."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.args.train_sampling_strategy = self.args.vlmtune_sampling

        def _prepare_dataset(self, dataset: Any, *args: Any, **kwargs: Any) -> Any:
            return dataset

    return UnpairedTrainer


def train(
    model: Any,
    processor: Any,
    family: Family,
    data: DataSection,
    train_section: TrainSection,
    options: KtoSection,
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
    options: KtoSection,
    *,
    run: RunDir,
    device: str,
    dtype: str,
    callbacks: list | None = None,
    report_to: list[str] | None = None,
) -> Any:
    """The answers pre-flighted and TRL's KTOTrainer set up on them, with its reference, not yet trained."""
    collator, train_items, eval_items = prepare_answers(processor, family, data, train_section, options, run)
    parallel = parallel_arguments(train_section, device, model, family)
    args = kto_config(train_section, options, run, device, dtype, eval_items is not None, report_to, parallel)
    return reference_trainer(
        kto_trainer_class(), model, processor, args, collator, train_items, eval_items, run=run,
        train=train_section, reference=options.reference, dtype=dtype, callbacks=callbacks,
    )  # fmt: skip
