"""A diverged run never says done: the non-finite guard during training, and the weights check after.

During training, the first NaN or inf in the loss or the gradients stops the run before the
optimizer applies it, so the weights in memory and every checkpoint on disk stay finite; the run is
marked failed with the step, what went non-finite and the likely cause. Why stop rather than skip
the step: in bfloat16 and float32 a non-finite value does not come and go, it is the start of a
divergence (a learning rate too high, a sample that overflows), and a skipped step would only hide
it. The one exception is float16 with a loss scaler, whose whole method is to meet inf gradients,
skip that step and lower the scale; there the guard stops only after ``MAX_SCALER_SKIPS`` skipped
steps in a row.

A run can also fail without a single non-finite number: with a learning rate of 1e9 the first
update throws the weights to ~1e9, from then on every gradient is exactly 0 and the loss is flat,
and the run would say "done". ``CollapseGuard`` watches for what such a run looks like, using only
figures every rank shares (weights and gradients after DDP's all-reduce, logged losses):
- the trainable weights' norm growing by an order of magnitude in one step, or by
  ``WEIGHT_GROWTH`` times since training started;
- the gradient norm exactly 0 for ``ZERO_GRAD_STEPS`` steps in a row while parameters are trainable
  (objectives whose loss can legitimately give no gradient, as GRPO with equal rewards, skip this);
- the logged loss rising far above its start (the mean of the last ``LOSS_WINDOW`` rows over
  ``LOSS_RISE`` times the first, and by more than ``LOSS_MARGIN``).
It stops the run as failed with the step, the evidence and the likely cause; checkpoints saved
from the step the collapse began are set aside (their completion marker says so), so the last
good checkpoint is the one a resume or a person would pick. ``train.divergence_checks: false``
turns these checks off (the non-finite guard stays).

After training, `vlmtune export`, `predict` and `eval` refuse weights that hold NaN or inf, or
values no trained model holds (``MAX_SANE_WEIGHT``); export and predict take ``--force``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlmtune.errors import RunDirError, VlmtuneError

MAX_SCALER_SKIPS = 10  # float16: 10 halvings of the loss scale without one usable step
ZERO_GRAD_STEPS = 3  # steps in a row with a gradient norm of exactly 0
STEP_GROWTH = 10.0  # the trainable weights' norm multiplied by this in one optimizer step
GROWING = 1.5  # steps that each multiply it by this or more: where a blow-up began
WEIGHT_GROWTH = 1000.0  # ... or by this since training started (three orders of magnitude)
LOSS_WINDOW = 3  # logged rows averaged for the loss-rise check
LOSS_RISE = 3.0  # their mean over this many times the first logged loss ...
LOSS_MARGIN = 1.0  # ... and over it by more than this (nats), so a tiny start loss does not trip it
MAX_SANE_WEIGHT = 1e5  # no trained weight is this large; a collapsed run's are (~1e9 at lr 1e9)


class TrainingDiverged(VlmtuneError):
    """The loss or the gradients became NaN or inf. ``figures`` go into summary.json."""

    exit_code = 3

    def __init__(self, message: str, hint: str, figures: dict):
        super().__init__(message, hint)
        self.figures = figures


def _kept(checkpoints: Path, bad_from: int | None) -> tuple[str, str | None]:
    """The last good checkpoint (before ``bad_from``), setting aside the ones saved at or after it."""
    from vlmtune.runs import trainer_checkpoints

    if bad_from is not None:
        trainer_checkpoints.set_aside_from(checkpoints, bad_from, "saved after the training collapsed")
    last_good = trainer_checkpoints.choose(checkpoints).chosen
    name = last_good.path.name if last_good else None
    return (
        f"the last good checkpoint, {name}, is kept" if name else "no checkpoint was saved before it"
    ), name


class NonFiniteGuard(TrainerCallback):
    """Checks each optimizer step's losses and gradients before the step is applied."""

    def __init__(self, lr: float, dtype: str, loss_scaled: bool, checkpoints: Path):
        self.lr = lr
        self.dtype = dtype
        self.loss_scaled = loss_scaled
        self.checkpoints = checkpoints
        self.losses: list[Any] = []  # this step's micro-batch losses, kept on device (no sync per batch)
        self.skipped_in_a_row = 0

    def observe_loss(self, loss: Any) -> None:
        self.losses.append(loss.detach())

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        import torch

        step = state.global_step + 1
        losses, self.losses = self.losses, []
        if losses:
            stacked = torch.stack([loss.float().reshape(()) for loss in losses])
            if not bool(torch.isfinite(stacked).all()):
                bad = stacked[~torch.isfinite(stacked)][0].item()
                raise self._diverged(step, "loss", bad)
        if model is not None and not gradients_finite(model):
            if self.loss_scaled and self.skipped_in_a_row < MAX_SCALER_SKIPS:
                self.skipped_in_a_row += 1  # the scaler skips this step and lowers its scale
                return
            raise self._diverged(step, "gradient", float("nan"))
        self.skipped_in_a_row = 0

    def _diverged(self, step: int, what: str, value: float) -> TrainingDiverged:
        cause = likely_cause(step, self.lr, self.dtype, self.loss_scaled and what == "gradient")
        kept, last_good = _kept(self.checkpoints, None)
        shown = "nan" if value != value else ("inf" if value > 0 else "-inf")
        figures = {
            "diverged_at_step": step,
            "non_finite": what,
            "value": shown,
            "likely_cause": cause,
            "last_good_checkpoint": last_good,
        }
        return TrainingDiverged(
            f"training diverged at step {step}: the {what} is {shown} (not finite); the run is marked failed "
            f"and {kept}. Likely cause: {cause}",
            hint="fix the cause and start a new run; the diverged weights were never applied or saved",
            figures=figures,
        )


class CollapseGuard(TrainerCallback):
    """Stops a run whose weights blew up or whose learning stopped, though every number is finite.

    ``loss_positive``: the objective's loss is above 0 whenever there is something to learn (SFT,
    DPO), so a zero gradient or a rising loss means a broken run; GRPO's is 0 when a group's rewards
    are equal and skips those two checks. ``state()`` goes into each checkpoint and ``restore()``
    puts it back, so a resumed run compares with the same start as the uninterrupted one.
    """

    def __init__(self, lr: float, dtype: str, checkpoints: Path, logging_steps: int, loss_positive: bool):
        self.lr = lr
        self.dtype = dtype
        self.checkpoints = checkpoints
        self.logging_steps = logging_steps
        self.loss_positive = loss_positive
        self.start_norm: float | None = None  # the trainable weights' norm before the first update
        self.last_norm: float | None = None
        self.growing_since: int | None = None  # the first of the steps in a row that grew the norm GROWING x
        self.zero_since: int | None = None  # the first step of the current run of zero gradients
        self.first_loss: float | None = None
        self.losses: list[tuple[int, float]] = []  # the last LOSS_WINDOW logged (step, loss)

    def state(self) -> dict:
        keys = ("start_norm", "last_norm", "growing_since", "zero_since", "first_loss", "losses")
        return {key: getattr(self, key) for key in keys}

    def restore(self, state: dict | None) -> None:
        for key, value in (state or {}).items():
            setattr(self, key, [tuple(v) for v in value] if key == "losses" else value)

    @property
    def suspicious(self) -> bool:
        """A collapse may be starting (weights growing step after step, zero gradients, a high loss): the
        checkpoints from before it must not be rotated away yet."""
        high = self.first_loss is not None and bool(self.losses) and self.losses[-1][1] > self._loss_limit()
        return self.growing_since is not None or self.zero_since is not None or high

    def _loss_limit(self) -> float:
        return max(LOSS_RISE * self.first_loss, self.first_loss + LOSS_MARGIN)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if self.start_norm is None and model is not None:
            self.start_norm = self.last_norm = trainable_norm(model)

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if not self.loss_positive or model is None:
            return
        step = state.global_step + 1
        norm = gradient_norm(model)
        if norm is None or norm != 0.0:
            self.zero_since = None
            return
        self.zero_since = self.zero_since or step
        if step - self.zero_since + 1 >= ZERO_GRAD_STEPS:
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            raise self._collapsed(
                step,
                "zero_gradient",
                f"the gradient norm has been exactly 0 for {step - self.zero_since + 1} steps in a row "
                f"(steps {self.zero_since}-{step}) while {trainable:,} parameters are trainable: the model "
                "has stopped learning",
                bad_from=self.zero_since - 1,  # the weights after that step already gave no gradient
            )

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        if model is None:
            return
        step = state.global_step + 1
        norm = trainable_norm(model)
        last, start = self.last_norm, self.start_norm
        self.last_norm = norm
        if not start:
            self.start_norm = norm or None
            return
        if last and norm > GROWING * last:
            self.growing_since = self.growing_since or step
        else:
            self.growing_since = None
        if last and norm > STEP_GROWTH * last:
            evidence = f"one update multiplied the trainable weights' norm by {norm / last:,.3g} ({last:.4g} -> {norm:.4g})"
        elif norm > WEIGHT_GROWTH * start:
            evidence = f"the trainable weights' norm grew {norm / start:,.3g} times since training started ({start:.4g} -> {norm:.4g})"
        else:
            return
        raise self._collapsed(step, "weights_blew_up", evidence, bad_from=self.growing_since or step)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any):
        loss = (logs or {}).get("loss")
        if not self.loss_positive or not isinstance(loss, (int, float)) or loss != loss:
            return
        if self.first_loss is None:
            self.first_loss = float(loss)
            return
        self.losses = [*self.losses, (state.global_step, float(loss))][-LOSS_WINDOW:]
        mean = sum(value for _, value in self.losses) / len(self.losses)
        limit = self._loss_limit()
        if len(self.losses) == LOSS_WINDOW and all(value > limit for _, value in self.losses):
            first_step = self.losses[0][0]
            raise self._collapsed(
                state.global_step,
                "loss_rose",
                f"the loss rose from {self.first_loss:.4g} at the start to {mean:.4g} (mean of the rows of steps "
                f"{first_step}-{state.global_step}), over {limit:.4g}",
                bad_from=max(first_step - self.logging_steps, 0),
            )

    def _collapsed(self, step: int, kind: str, evidence: str, bad_from: int) -> TrainingDiverged:
        cause = likely_cause(step, self.lr, self.dtype, False, collapsed=True)
        kept, last_good = _kept(self.checkpoints, bad_from)
        figures = {
            "diverged_at_step": step,
            "collapse": kind,
            "evidence": evidence,
            "likely_cause": cause,
            "last_good_checkpoint": last_good,
        }
        return TrainingDiverged(
            f"training collapsed at step {step}: {evidence}; the run is marked failed and {kept}. "
            f"Likely cause: {cause}",
            hint="fix the cause and start a new run (train.divergence_checks: false turns these checks off "
            "for a run that is fine)",
            figures=figures,
        )


def trainable_norm(model: Any) -> float:
    """The L2 norm of every trainable parameter together (one device sync)."""
    return global_norm([p.detach() for p in model.parameters() if p.requires_grad])


def gradient_norm(model: Any) -> float | None:
    """The L2 norm of every gradient together; None when no parameter has one."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return global_norm(grads) if grads else None


def global_norm(tensors: list[Any]) -> float:
    """The L2 norm of tensors together. FSDP's sharded parameters (DTensors) count their local shard,
    summed over the ranks, so every rank gets the same figure (and the same verdict)."""
    import torch
    import torch.distributed as dist

    if not tensors:
        return 0.0
    sharded = any(hasattr(t, "to_local") for t in tensors)
    squares = [
        torch.linalg.vector_norm((t.to_local() if hasattr(t, "to_local") else t).float()) ** 2
        for t in tensors
    ]
    total = torch.stack(squares).sum()
    if sharded and dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return float(total.sqrt())


def gradients_finite(model: Any) -> bool:
    """True when every gradient of a trainable parameter is finite (one device sync)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    return bool(torch.isfinite(norms).all())


def likely_cause(step: int, lr: float, dtype: str, scaler_gave_up: bool, collapsed: bool = False) -> str:
    if collapsed:
        if lr > 1e-2:
            return f"train.lr {lr:g} is far above the usual rates (1e-5 to 1e-3 for LoRA): lower it"
        return (
            "the learning rate is too high for this model and data (lower train.lr, add train.warmup_steps), "
            "or the loss does not reach the trainable weights"
        )
    if scaler_gave_up:
        return (
            f"float16 overflow: the loss scaler skipped {MAX_SCALER_SKIPS} steps in a row; train with "
            "model.dtype: bfloat16"
        )
    if step == 1:
        return (
            "the very first step is not finite, before any update: the model or the data give NaN/inf "
            "(float16 overflows in many models: use model.dtype: bfloat16)"
        )
    if dtype == "float16":
        return "float16 overflow: train with model.dtype: bfloat16"
    if lr > 1e-2:
        return f"train.lr {lr:g} is far above the usual rates (1e-5 to 1e-3 for LoRA): lower it"
    return "the learning rate is too high for this model and data: lower train.lr or add train.warmup_steps"


# --- after training -------------------------------------------------------------------------------


def nonfinite_tensors(files: list[Path]) -> list[str]:
    """Names of the tensors in these safetensors files that hold NaN or inf (read one at a time)."""
    return [name for name, problem in unsound_tensors(files) if problem == "nan"]


def unsound_tensors(files: list[Path]) -> list[tuple[str, str]]:
    """(name, "nan" | "huge") of every tensor holding NaN/inf or a value over MAX_SANE_WEIGHT."""
    import torch
    from safetensors import safe_open

    bad = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if not tensor.is_floating_point() or tensor.numel() == 0:
                    continue
                if not bool(torch.isfinite(tensor).all()):
                    bad.append((name, "nan"))
                elif float(tensor.abs().max()) > MAX_SANE_WEIGHT:
                    bad.append((name, "huge"))
    return bad


def refuse_nonfinite(weights: Path, force: bool = False) -> None:
    """A RunDirError when the run's final weights hold NaN or inf, or values no trained model holds
    (a run that diverged or collapsed); ``force`` lets the huge ones through, never NaN."""
    files = sorted(weights.glob("*.safetensors"))
    bad = unsound_tensors(files)
    nan = [name for name, problem in bad if problem == "nan"]
    huge = [name for name, problem in bad if problem == "huge"]
    if nan:
        raise RunDirError(
            f"the weights in {weights} hold NaN or inf in {len(nan)} tensor(s), e.g. {nan[0]}: "
            "the training diverged, so these weights are not a trained model",
            hint="train again with a lower train.lr (vlmtune now stops a run whose loss or gradients "
            "become NaN/inf and keeps its last good checkpoint)",
        )
    if huge and not force:
        raise RunDirError(
            f"the weights in {weights} hold values over {MAX_SANE_WEIGHT:g} in {len(huge)} tensor(s), e.g. "
            f"{huge[0]}: the training collapsed (no trained model holds such weights)",
            hint="train again with a sensible train.lr (vlmtune now stops such runs and keeps their last good "
            "checkpoint); --force uses these weights anyway",
        )
