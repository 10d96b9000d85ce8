"""What a run needs to stop and resume exactly, as a mixin for any TRL trainer of vlmtune's
(``class VlmtuneTrainer(ReliableTrainerMixin, SFTTrainer)``; a DPO or GRPO trainer the same way):

- the data order: length-grouped batches drawn from a generator seeded by (seed, epoch), so a
  resume in the middle of an epoch replays the same order (the Trainer's own length-grouped
  sampler draws from the global RNG, which a resume cannot rewind to the epoch's start); a trainer
  with a sampler of its own (GRPO's prompt repeats) wraps it in EpochSeededSampler for the same;
- the weights on resume: the checkpoint's adapter is copied into the live LoRA parameters, keeping
  their dtype (the Trainer's resume replaces them with new float32 ones, while TRL trains the LoRA
  weights of a quantized model in bfloat16);
- the log rows across a resume: what the Trainer summed since its last log row (loss, TRL's
  metrics) is saved with each checkpoint and put back, so with logging_steps > 1 the first row
  after a resume averages the same steps as the uninterrupted run's; so is TRL's count of the
  tokens trained on (logged as num_tokens and eval_num_tokens);
- checkpoints that count only once complete (vlmtune.runs.trainer_checkpoints), rotated by vlmtune:
  the trainer's config must have save_total_limit=None, since the Trainer's rotation counts partial
  checkpoints too;
- the non-finite guard and the collapse guard (vlmtune.training.finite), the collapse guard's
  reference figures carried in each checkpoint;
- a stop asked by SIGTERM or SIGHUP (vlmtune.runs.signals.graceful): the step in progress finishes,
  a complete checkpoint is saved (every rank agreeing on the step), then the run stops as
  interrupted, and a resume continues from that very step;
- a checkpoint file that fails to load: a message naming the checkpoint, not a traceback.

The restored state and its proof: tests/test_resume.py, docs/reliability.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from vlmtune import distributed
from vlmtune.runs import rundir, signals, trainer_checkpoints
from vlmtune.runs.trainer_checkpoints import CheckpointError
from vlmtune.training.finite import CollapseGuard, NonFiniteGuard


class EpochSeededLengthSampler(LengthGroupedSampler):
    """Length-grouped order drawn from a generator seeded by (seed, epoch): every epoch's order is a
    function of the epoch alone, so a resumed run replays it batch for batch."""

    def __init__(self, batch_size: int, lengths: list[int], seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # the Trainer (through accelerate) calls it each epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


class EpochSeededSampler(torch.utils.data.Sampler):
    """Another sampler that draws its order from its own ``generator`` (TRL's GRPO RepeatSampler, seeded
    once and then advanced epoch after epoch), reseeded by (seed, epoch) at each epoch's start: a
    resume in a later epoch draws that epoch's order, not the first epoch's again."""

    def __init__(self, sampler: Any, seed: int):
        self.sampler = sampler
        self.seed = seed

    def set_epoch(self, epoch: int) -> None:
        if getattr(self.sampler, "generator", None) is not None:
            self.sampler.generator = torch.Generator().manual_seed(self.seed + epoch)

    def __iter__(self) -> Iterator[int]:
        return iter(self.sampler)

    def __len__(self) -> int:
        return len(self.sampler)


class ReliableTrainerMixin:
    """Put before the TRL trainer class in the bases. ``keep_checkpoints``: complete checkpoints kept
    (None: all); ``dtype``: the recipe's model.dtype (for the guard's likely cause); ``best``: the
    train.best_metric watcher (vlmtune.training.best), whose best checkpoint rotation keeps too;
    ``divergence_checks``: the collapse guard (train.divergence_checks)."""

    # The objective's loss is above 0 whenever there is something to learn (the collapse guard's zero
    # gradient and rising loss checks); GRPO's trainer sets False.
    loss_positive = True

    def __init__(
        self,
        *args: Any,
        keep_checkpoints: int | None = None,
        dtype: str = "bfloat16",
        best: Any = None,
        divergence_checks: bool = True,
        **kwargs: Any,
    ):
        super().__init__(*args, **kwargs)
        self.keep_checkpoints = keep_checkpoints
        self.best = best
        if best is not None:
            self.add_callback(best)
        self.guard = NonFiniteGuard(
            lr=self.args.learning_rate,
            dtype=dtype,
            loss_scaled=getattr(self.accelerator, "scaler", None) is not None,
            checkpoints=Path(self.args.output_dir),
        )
        self.add_callback(self.guard)
        self.collapse = None
        if divergence_checks:
            self.collapse = CollapseGuard(
                lr=self.args.learning_rate,
                dtype=dtype,
                checkpoints=Path(self.args.output_dir),
                logging_steps=self.args.logging_steps,
                loss_positive=self.loss_positive,
            )
            self.add_callback(self.collapse)
        self.unlogged_carry: dict | None = None  # from the checkpoint a resume starts at
        self.add_callback(_RestoreUnlogged(self))
        self.add_callback(_StopAtStepBoundary())

    def train_from(self, checkpoint: Path | None) -> None:
        """Train to the end, from a complete checkpoint when given (vlmtune.runs.resuming chose it). A
        checkpoint at the last step (a stop during the final save) only has its weights loaded: the
        Trainer would take one step more."""
        start = (trainer_checkpoints.step_of(checkpoint) or 0) if checkpoint is not None else 0
        if checkpoint is not None and start >= self.planned_steps():
            self.load_checkpoint_weights(checkpoint)
            self.state.global_step = start
        else:
            self.train(resume_from_checkpoint=str(checkpoint) if checkpoint is not None else None)

    def planned_steps(self) -> int:
        """Optimizer steps the whole run takes: train.max_steps, or the epochs' worth of steps."""
        return self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]

    # train.offload_activations (set by vlmtune.stages.common.run_trainer): saved activations in host memory
    offload_activations = False
    # train.lr_vision/lr_projector/lr_language and loraplus_lr_ratio (vlmtune.training.param_groups.GroupRates,
    # set by run_trainer): the optimizer's parameter groups, each group's rate logged; None: the Trainer's own
    parameter_groups: Any = None

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.parameter_groups is not None:
            self.optimizer = self.parameter_groups.optimizer(self, self.model if model is None else model)
        return super().create_optimizer(model)

    def log(self, logs: dict, *args: Any, **kwargs: Any) -> None:
        if self.parameter_groups is not None and self.optimizer is not None and "loss" in logs:
            logs = {**logs, **self.parameter_groups.logged(self.optimizer)}
        super().log(logs, *args, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        from vlmtune.training.offload import activation_offload

        with activation_offload(self.offload_activations):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self.guard.observe_loss(loss)
        return loss

    # --- data order -------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        column = self.args.length_column_name
        if self.args.train_sampling_strategy != "group_by_length" or column not in dataset.column_names:
            return super()._get_train_sampler(train_dataset)
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        batch = self.args.train_batch_size * self.args.gradient_accumulation_steps
        return EpochSeededLengthSampler(batch, list(dataset[column]), seed)

    # --- checkpoints ------------------------------------------------------------------------------

    def _save_checkpoint(self, model, trial):
        """Under torchrun every rank writes into the checkpoint (its RNG state; FSDP: its shards), so
        rank 0 discards a partial folder before any rank writes and marks it complete after all have."""
        folder = Path(self.args.output_dir) / f"{rundir.CHECKPOINT_PREFIX}{self.state.global_step}"
        if self.args.should_save:
            trainer_checkpoints.discard(folder)  # a partial save of this step by an interrupted attempt
        distributed.barrier()
        super()._save_checkpoint(model, trial)
        distributed.barrier()
        if self.args.should_save:
            guard = self.collapse.state() if self.collapse else None
            extra = {
                "unlogged": self._unlogged(),
                "collapse_guard": guard,
                **(self.best.marker(self.state.global_step) if self.best else {}),
            }
            trainer_checkpoints.mark_complete(folder, extra)
            # while a collapse may be starting, the checkpoints from before it are kept
            suspicious = self.collapse is not None and self.collapse.suspicious
            best_by = (self.best.key, self.best.greater) if self.best else None
            trainer_checkpoints.rotate(folder.parent, None if suspicious else self.keep_checkpoints, best_by)
        distributed.barrier()  # no rank runs ahead to a resume-able state before the marker exists

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if resume_from_checkpoint:
            marker = trainer_checkpoints.marker(Path(resume_from_checkpoint))
            self.unlogged_carry = marker.get("unlogged")
            if self.best is not None:  # the measurements before the checkpoint, for the best and the patience
                self.best.restore(Path(resume_from_checkpoint).parent, marker["step"])
            if self.collapse is not None:
                self.collapse.restore(marker.get("collapse_guard"))
            # The eval before the first step belongs to the first attempt (its row is kept in
            # metrics.jsonl); a resume that ran it again would log it twice, at the checkpoint's step.
            self.args.eval_on_start = False
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _unlogged(self) -> dict:
        """What the Trainer has summed since its last log row (private Trainer/TRL state, read defensively)."""
        loss = getattr(self, "_tr_loss", None)
        return {
            "since_step": getattr(self, "_globalstep_last_logged", None),
            "loss_sum": float(loss.item()) if loss is not None else None,
            "metrics": {key: list(values) for key, values in _train_metrics(self).items()},
            # TRL's running count of training tokens (DPO, SFT: the num_tokens and eval_num_tokens logged)
            "total_train_tokens": getattr(self, "_total_train_tokens", None),
        }

    def restore_unlogged(self) -> None:
        """Put back what was summed since the last log row before the checkpoint (the Trainer has just
        reset it for this train() call)."""
        carry, self.unlogged_carry = self.unlogged_carry, None
        if not carry or carry["loss_sum"] is None or not hasattr(self, "_tr_loss"):
            return
        if carry.get("total_train_tokens") is not None and hasattr(self, "_total_train_tokens"):
            self._total_train_tokens = carry["total_train_tokens"]
        self._tr_loss += carry["loss_sum"]
        self._globalstep_last_logged = carry["since_step"]
        for key, values in carry["metrics"].items():
            _train_metrics(self).setdefault(key, []).extend(values)

    def load_checkpoint_weights(self, checkpoint: Path) -> None:
        """A checkpoint's trained weights into the live model, without training."""
        self._load_from_checkpoint(str(checkpoint))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        # FSDP holds the parameters as shards: the Trainer's own loading gathers them
        if model is None and hasattr(self.model, "peft_config") and not self.is_fsdp_enabled:
            self._load_adapter_in_place(Path(resume_from_checkpoint))
            return
        with _reading(resume_from_checkpoint, "the model weights"):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_adapter_in_place(self, checkpoint: Path) -> None:
        """Copy a checkpoint's adapter into the live LoRA parameters: same tensors, same dtype."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = self.model.active_adapter  # a frozen reference adapter (DPO's "ref") never changes
        with _reading(checkpoint, rundir.PEFT_WEIGHTS):
            state = load_file(str(checkpoint / rundir.PEFT_WEIGHTS))
            result = set_peft_model_state_dict(self.model, state, adapter_name=adapter)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter}." in k]
        if result.unexpected_keys or missing:
            raise CheckpointError(
                f"the adapter in {checkpoint} does not fit this model: "
                f"{len(result.unexpected_keys)} unexpected and {len(missing)} missing LoRA weights "
                f"(e.g. {(result.unexpected_keys or missing)[0]})",
                hint="resume with the recipe the run was started with (resolved.yaml as written)",
            )

    def _load_optimizer_and_scheduler(self, checkpoint):
        with _reading(checkpoint, "the optimizer and scheduler states"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with _reading(checkpoint, "the random number generator states"):
            super()._load_rng_state(checkpoint)


class _RestoreUnlogged(TrainerCallback):
    """on_train_begin comes right after the Trainer resets its running sums: the moment to restore them."""

    def __init__(self, trainer: ReliableTrainerMixin):
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer.restore_unlogged()


class _StopAtStepBoundary(TrainerCallback):
    """A SIGTERM/SIGHUP asked for a stop: at the end of the step in progress, save and stop.

    Under torchrun the ranks agree first (one all-reduce of the signal per step), so every rank saves
    the same step together even when the signal reached them during different steps. The save is the
    Trainer's own (``should_save``), so the checkpoint is complete in every way a periodic one is; once
    it is marked complete, ``on_save`` raises the stop (signals.Interrupted)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.asked_at: float | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        signum = _agreed(signals.stop_requested())
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.signum:
            signals.stop_now(self.signum, saved_step=state.global_step)


def _agreed(signum: int | None) -> int:
    """The highest signal any rank was asked to stop by (0: none); this rank's own outside a launch."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return signum or 0
    device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([signum or 0], dtype=torch.int64, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag.item())


def _train_metrics(trainer: Any) -> dict:
    """TRL's running lists of training metrics (mean_token_accuracy, ...) since the last log row."""
    metrics = getattr(trainer, "_metrics", None)
    return metrics["train"] if metrics is not None else {}


@contextlib.contextmanager
def _reading(checkpoint: str | Path, what: str) -> Iterator[None]:
    """A checkpoint that passed its integrity check and still fails to load: a message, not a traceback."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"cannot read {what} of checkpoint {checkpoint}: {first}",
            hint="move that checkpoint folder aside: the resume then starts from the one before it",
        ) from exc
