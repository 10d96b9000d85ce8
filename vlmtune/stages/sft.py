"""Stage 3, sft: pre-flight the data, then train with TRL's SFTTrainer and our collator.

Writes 3-train/data_report.json before the first step, metrics.jsonl as training logs, and
checkpoints/ plus the final adapter/ (or model/ for full fine-tuning) at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data import Sample
from vlmtune.data.collator import VisionCollator
from vlmtune.data.lengths import TokenCounter
from vlmtune.data.packing import PackedCollator, PackedRows, pack
from vlmtune.data.preflight import CheckedSplit, check_split
from vlmtune.errors import ModelError
from vlmtune.model.families import Family
from vlmtune.recipe import DataSection, TrainSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.stages import TrainResult, common
from vlmtune.stages.common import parallel_arguments, positions, run_trainer, trainer_arguments


@dataclass
class SampleSet:
    """The samples the trainer indexes, with their measured lengths (for length grouping)."""

    samples: list[Sample]
    lengths: list[int]  # tokens per sample, image tokens included


class SampleCollator:
    """Turns the trainer's rows (sample positions) into model inputs.

    TRL only accepts `datasets` datasets, so the dataset holds positions and the samples (with
    their lazy image sources) stay here; the whole object pickles for DataLoader workers.
    """

    def __init__(self, collator: VisionCollator, samples: list[Sample], packed: PackedCollator | None = None):
        self.collator = collator
        self.samples = samples
        self.packed = packed

    def __call__(self, rows: list[dict]) -> dict:
        if "members" in rows[0]:  # a packed row (train.packing): one row per batch
            (row,) = rows
            return self.packed([self.samples[i] for i in row["members"]])
        return self.collator([self.samples[row["position"]] for row in rows])


def packed_rows(rows: PackedRows) -> Any:
    """Rows for the trainer under train.packing: each the sample positions of one packed row, and its tokens."""
    from datasets import Dataset

    return Dataset.from_dict({"members": rows.rows, "length": rows.lengths})


def check_packing(family: Family, train: TrainSection) -> None:
    """train.packing on a family whose packed rows are not proven to train like its samples: refused."""
    if train.packing and family.packing is None:
        raise ModelError(
            f"train.packing is not supported for {family.title}: {family.packing_refused}",
            hint="set train.packing: false (train.group_by_length keeps padding low), or pick a family that "
            "packs (`vlmtune inspect` says whether a model's family can)",
        )


def prepare_data(
    processor: Any, family: Family, data: DataSection, train: TrainSection, run: RunDir
) -> tuple[VisionCollator, SampleSet, SampleSet | None]:
    """Pre-flight every split, write the data report, return the datasets."""
    collator = VisionCollator(
        processor, family, max_length=None, train_on_responses_only=data.train_on_responses_only
    )

    counter = TokenCounter(collator)  # lengths as the processor builds them, from image sizes alone
    reports = {"train": check_split("train", data.train, data, train.max_length, counter)}
    if data.eval:
        reports["eval"] = check_split("eval", data.eval, data, train.max_length, counter)
    run.write_json(rundir.DATA_REPORT, {name: r.to_json() for name, r in reports.items()})
    collator.max_length = train.max_length
    eval_split = reports.get("eval")
    return (
        collator,
        select(reports["train"], data, train.seed),
        (SampleSet(eval_split.samples, eval_split.lengths) if eval_split else None),
    )


def select(checked: CheckedSplit, data: DataSection, seed: int) -> SampleSet:
    """data.shuffle and data.max_samples applied (stages.common.select), as the samples SFT collates."""
    chosen = common.select(checked, data, seed)
    return SampleSet(chosen.items, chosen.lengths)


def sft_config(
    train: TrainSection,
    run: RunDir,
    device: str,
    dtype: str,
    has_eval: bool,
    report_to: list[str],
    parallel: dict | None = None,
) -> Any:
    """``parallel``: the launch's DDP / FSDP arguments (stages.common.parallel_arguments)."""
    from trl import SFTConfig

    arguments = trainer_arguments(train, run, device, dtype, has_eval, report_to, parallel)
    if train.packing:  # a device batch is one packed row of up to max_tokens_per_batch tokens
        arguments["per_device_train_batch_size"] = 1
    return SFTConfig(
        **arguments,
        # Our collator builds the batches: TRL must not tokenize the data itself.
        dataset_kwargs={"skip_prepare_dataset": True},
        max_length=None,
    )


def train(
    model: Any,
    processor: Any,
    family: Family,
    data: DataSection,
    train_section: TrainSection,
    options: None = None,  # sft has no section of its own
    *,
    run: RunDir,
    device: str,
    dtype: str,
    resume: Path | None = None,
    callbacks: list | None = None,
    report_to: list[str] | None = None,
) -> TrainResult:
    """Train to the recipe's end; ``resume`` is the complete checkpoint to continue from (None: step 0)."""
    from vlmtune.training.best import BestTracker
    from vlmtune.training.callbacks import MetricsWriter
    from vlmtune.training.trainer import VlmtuneTrainer

    check_packing(family, train_section)
    collator, train_split, eval_split = prepare_data(processor, family, data, train_section, run)
    # Train and eval rows index one list, so one collator serves both.
    samples = train_split.samples + (eval_split.samples if eval_split else [])
    parallel = parallel_arguments(train_section, device, model, family)
    rows = (
        pack(train_split.lengths, train_section.packing_budget, train_section.seed)
        if train_section.packing
        else None
    )
    heaviest_first = train_section.heaviest_first
    trainer = VlmtuneTrainer(
        model=model,
        args=sft_config(train_section, run, device, dtype, eval_split is not None, report_to or [], parallel),
        train_dataset=packed_rows(rows) if rows else positions(0, train_split.lengths),
        eval_dataset=positions(len(train_split.samples), eval_split.lengths) if eval_split else None,
        processing_class=processor,
        data_collator=SampleCollator(collator, samples, PackedCollator(collator, family) if rows else None),
        callbacks=[MetricsWriter(run), *(callbacks or [])],
        supervised_loss=train_section.supervised_loss,
        keep_checkpoints=train_section.save_total_limit,
        best=BestTracker.from_section(train_section),
        divergence_checks=train_section.divergence_checks,
        dtype=dtype,
        family=family,
        packed_weights=rows.lengths if rows else None,
        heaviest_first=device == "cuda" if heaviest_first is None else heaviest_first,
    )
    if train_section.eval_generate_steps and eval_split:
        from vlmtune.training.answer_eval import AnswerEval, sample_items

        items = sample_items(eval_split.samples, train_section.eval_max_samples, train_section.seed)
        trainer.add_callback(AnswerEval(trainer, processor, items, train_section))
    return run_trainer(trainer, processor, run, device, resume, train_section, family)
