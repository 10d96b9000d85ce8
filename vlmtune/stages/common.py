"""What every objective's train stage shares around its TRL trainer (sft, dpo, kto, grpo).

An objective pre-flights its items (samples, pairs, prompts) through vlmtune.data.preflight, hands TRL a
dataset of positions (TRL only takes `datasets` datasets; the items, with their lazy images, stay in
our collator), builds its trainer from ``trainer_arguments`` plus its own knobs, and ``run_trainer``
trains it with vlmtune's metrics writer and observers and saves the final weights into 3-train/.

Under torchrun this is where every objective gets the launch's behaviour: ``trainer_arguments``
carries the DDP / FSDP arguments (``parallel_arguments``), and ``run_trainer`` switches FSDP on for
CPU, gathers a sharded model's weights and lets rank 0 alone write them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune import distributed
from vlmtune.data.images import ImageUnreadable
from vlmtune.data.preflight import CheckedSplit
from vlmtune.model.families import Family
from vlmtune.recipe import DataSection, TrainSection
from vlmtune.runs import rundir, signals
from vlmtune.runs.rundir import RunDir
from vlmtune.stages import TrainResult

REFERENCE_ADAPTER = "ref"  # the name TRL (DPO, GRPO) gives its frozen copy of an adapter it is handed


@dataclass
class Selected:
    """The items the trainer indexes, with their measured lengths (for length grouping)."""

    items: list[Any]
    lengths: list[int]  # tokens per item, image tokens included


def select(checked: CheckedSplit, data: DataSection, seed: int) -> Selected:
    """data.shuffle (with train.seed) and data.max_samples applied to a pre-flighted split."""
    order = list(range(len(checked.samples)))
    if data.shuffle:
        random.Random(seed).shuffle(order)
    if data.max_samples:
        order = order[: data.max_samples]
    return Selected([checked.samples[i] for i in order], [checked.lengths[i] for i in order])


def positions(start: int, lengths: list[int]) -> Any:
    """Rows for the trainer: a position in the item list and the measured length (for grouping)."""
    from datasets import Dataset

    return Dataset.from_dict({"position": list(range(start, start + len(lengths))), "length": lengths})


class IndexedCollator:
    """Turns the trainer's rows (item positions) into a batch; pickles for DataLoader workers."""

    def __init__(self, collate: Callable[[list], dict], items: list):
        self.collate = collate
        self.items = items

    def __call__(self, rows: list[dict]) -> dict:
        return self.collate([self.items[row["position"]] for row in rows])


def parallel_arguments(train: TrainSection, device: str, model: Any, family: Family) -> dict:
    """The launch's DDP / FSDP TrainingArguments (nothing for one process): ``trainer_arguments``' ``parallel``."""
    return distributed.trainer_arguments(train.distributed, device, model, family)


def trainer_arguments(
    train: TrainSection,
    run: RunDir,
    device: str,
    dtype: str,
    has_eval: bool,
    report_to: list[str],
    parallel: dict | None = None,
) -> dict:
    """The TrainingArguments every objective takes from the train section (and output.report_to).

    ``parallel``: the launch's DDP / FSDP arguments (``parallel_arguments``); a run under torchrun
    without them would train each rank alone.
    """
    from vlmtune.observe.trackers import trainer_args

    return dict(
        output_dir=str(run / rundir.CHECKPOINTS),
        max_steps=train.max_steps,
        num_train_epochs=train.epochs,
        per_device_train_batch_size=train.batch_size,
        per_device_eval_batch_size=train.batch_size,
        gradient_accumulation_steps=train.grad_accum,
        learning_rate=train.lr,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps,
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        optim=train.optim,
        seed=train.seed,
        logging_steps=train.logging_steps,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=None,  # vlmtune rotates: only complete checkpoints count (ReliableTrainerMixin)
        eval_strategy="steps" if has_eval and train.eval_steps else "no",
        eval_steps=train.eval_steps,
        eval_on_start=has_eval and train.eval_steps is not None,  # the held-out figures before any step
        activation_checkpointing=train.gradient_checkpointing,
        # reentrant checkpointing starves vision LoRA of gradients
        activation_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16" and device == "cuda",
        use_cpu=device == "cpu",
        dataloader_num_workers=train.num_workers,
        train_sampling_strategy="group_by_length" if train.group_by_length else "random",
        length_column_name="length",
        torch_compile=train.torch_compile,
        prediction_loss_only=True,  # eval needs the loss and the logged metrics, never the logits
        **trainer_args(report_to, run),  # report_to, run_name
        disable_tqdm=True,
        remove_unused_columns=False,  # the rows are positions for our collator, not model inputs
        **(parallel or {}),
    )


def run_trainer(
    trainer: Any,
    processor: Any,
    run: RunDir,
    device: str,
    resume: Path | None,
    train: TrainSection | None = None,
    family: Family | None = None,
) -> TrainResult:
    """Train (from ``resume``, a complete checkpoint, when given), save the final weights, report the losses.

    The trainer mixes in vlmtune.training.reliable_trainer.ReliableTrainerMixin. ``train`` and ``family``
    switch on train.kernels, train.offload_activations and the optimizer's groups (train.lr_vision & co.,
    train.loraplus_lr_ratio; left out: none of them)."""
    from transformers.trainer_callback import PrinterCallback

    from vlmtune import observe

    if train is not None and family is not None:
        from vlmtune.training.param_groups import GroupRates

        speed_switches(trainer, train, family, run, device)
        trainer.parameter_groups = GroupRates.from_train(train, family)  # train.lr_vision & co., LoRA+
    trainer.remove_callback(PrinterCallback)  # our metrics writer and progress bar replace the printed dicts
    observe.attach(trainer, run, device)  # peak memory in every logged row; trackers' folders
    distributed.shard_on_cpu(trainer)
    try:
        with signals.graceful():  # SIGTERM/SIGHUP: finish the step, save a checkpoint, then stop
            trainer.train_from(resume)
    except ImageUnreadable as exc:  # an image deleted (or a URL failing) after the pre-flight
        raise exc.for_run(run.path) from None
    output = save_final(trainer, processor, run)
    # Every rank waits for rank 0's last metrics row and the saved weights before reading or leaving.
    distributed.barrier()
    losses = run.losses()
    best = getattr(trainer, "best", None)  # train.best_metric: the best checkpoint, an early stop
    return TrainResult(
        losses[0] if losses else None,
        losses[-1] if losses else None,
        trainer.state.global_step,
        output,
        best.figures(run.path, run / rundir.CHECKPOINTS) if best is not None else {},
    )


def speed_switches(trainer: Any, train: TrainSection, family: Family, run: RunDir, device: str) -> dict:
    """train.kernels (the measured-faster Triton kernels swapped into the model, CUDA only, not under
    FSDP) and train.offload_activations, set on the trainer and written to summary.json."""
    from vlmtune.kernels.patching import chosen, patch_model

    kernels = chosen(train.kernels, device)
    if kernels and trainer.args.fsdp:  # the swapped forwards read whole weights; FSDP shards them
        kernels = ()
    if kernels:
        from vlmtune.kernels import require_triton

        require_triton()
    report = patch_model(trainer.model, family, kernels)
    trainer.offload_activations = train.offload_activations
    switches = {
        "kernels": train.kernels,
        "kernels_used": report.as_dict(),
        "offload_activations": train.offload_activations,
    }
    run.record(**{rundir.SPEED_SWITCHES: switches})
    return switches


def save_final(trainer: Any, processor: Any, run: RunDir) -> str:
    """3-train/adapter (the trained adapter only, not a frozen reference copy) or 3-train/model.

    Every rank calls it (under FSDP, gathering the shards is a collective); rank 0 alone writes.
    """
    from vlmtune.model.processing import save_processor

    model = trainer.model
    state_dict = distributed.full_state_dict(trainer)  # FSDP: gathered from every rank's shard; else None
    is_peft = hasattr(model, "peft_config")
    out = run / (rundir.ADAPTER if is_peft else rundir.FULL_MODEL)
    if not run.writer:
        return str(out)
    if is_peft:
        model.save_pretrained(str(out), state_dict=state_dict, selected_adapters=[model.active_adapter])
    else:
        model.save_pretrained(str(out), state_dict=state_dict)
    save_processor(processor, out)
    return str(out)


def adds_nothing(model: Any) -> bool:
    """Is the active adapter still the identity (peft initialises every lora_B to zero)?"""
    import torch

    active = f".{model.active_adapter}."
    for name, param in model.named_parameters():
        if active in name and "lora_B" in name and torch.count_nonzero(param):
            return False
    for module in model.modules():  # lora.train_projector: a trainable copy of the projector
        copies = getattr(module, "modules_to_save", None)
        if copies is not None and model.active_adapter in copies:
            original, trained = module.original_module.state_dict(), copies[model.active_adapter].state_dict()
            if any(not torch.equal(original[key], trained[key]) for key in original):
                return False
    return True


def reference_trainer(
    trainer_class: type,
    model: Any,
    processor: Any,
    args: Any,
    collator: Callable,
    train_split: Selected,
    eval_split: Selected | None,
    *,
    run: RunDir,
    train: TrainSection,
    reference: str,
    dtype: str,
    callbacks: list | None = None,
) -> Any:
    """A preference objective's TRL trainer (DPO, KTO) on pre-flighted items, with its reference model: a frozen
    copy for full fine-tuning; for an adapter TRL's own (kept or dropped per ``reference``). The train and eval
    rows are positions into one list of items, which the collator turns into batches."""
    from vlmtune.training.best import BestTracker
    from vlmtune.training.callbacks import MetricsWriter

    items = train_split.items + (eval_split.items if eval_split else [])
    trainer = trainer_class(
        model=model,
        ref_model=None if hasattr(model, "peft_config") else frozen_copy(model),
        args=args,
        train_dataset=positions(0, train_split.lengths),
        eval_dataset=positions(len(train_split.items), eval_split.lengths) if eval_split else None,
        processing_class=processor,
        data_collator=IndexedCollator(collator, items),
        callbacks=[MetricsWriter(run), *(callbacks or [])],
        keep_checkpoints=train.save_total_limit,
        best=BestTracker.from_section(train),
        divergence_checks=train.divergence_checks,
        dtype=dtype,
    )
    drop_needless_reference_copy(trainer.model, reference)
    return trainer


def frozen_copy(model: Any) -> Any:
    """Full fine-tuning's reference: the model as training starts, frozen (a second set of weights)."""
    import copy

    reference = copy.deepcopy(model)
    reference.requires_grad_(False)
    return reference.eval()


def drop_needless_reference_copy(model: Any, reference: str) -> None:
    """The preference objectives' reference (dpo.reference, kto.reference). TRL copies any adapter it is
    handed into a frozen "ref" adapter. Without it TRL disables the adapter for the reference (the base
    answers): what ``reference: base`` asks for, and the same model as the copy when the adapter is
    fresh, for less memory and compute."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}) and (
        reference == "base" or adds_nothing(model)
    ):
        model.delete_adapter(REFERENCE_ADAPTER)
