"""A diverged run never says done: the non-finite guard during training, and the weights check after.

During training, the first NaN or inf in the loss or the gradients stops the run before the
optimizer applies it, so the weights in memory and every checkpoint on disk stay finite; the run is
marked failed with the step, what went non-finite and the likely cause. Why stop rather than skip
the step: in bfloat16 and float32 a non-finite value does not come and go, it is the start of a
divergence (a learning rate too high, a sample that overflows), and a skipped step would only hide
it. The one exception is float16 with a loss scaler, whose whole method is to meet inf gradients,
skip that step and lower the scale; there the guard stops only after ``MAX_SCALER_SKIPS`` skipped
steps in a row.

After training, `vlmtune export`, `predict` and `eval` refuse weights that hold NaN or inf.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from vlmtune.errors import RunDirError, VlmtuneError

MAX_SCALER_SKIPS = 10  # float16: 10 halvings of the loss scale without one usable step


class TrainingDiverged(VlmtuneError):
    """The loss or the gradients became NaN or inf. ``figures`` go into summary.json."""

    exit_code = 3

    def __init__(self, message: str, hint: str, figures: dict):
        super().__init__(message, hint)
        self.figures = figures


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
        from vlmtune.runs import trainer_checkpoints

        cause = likely_cause(step, self.lr, self.dtype, self.loss_scaled and what == "gradient")
        last_good = trainer_checkpoints.choose(self.checkpoints).chosen
        kept = (
            f"the last good checkpoint, {last_good.path.name}, is kept"
            if last_good
            else "no checkpoint was saved before it"
        )
        shown = "nan" if value != value else ("inf" if value > 0 else "-inf")
        figures = {
            "diverged_at_step": step,
            "non_finite": what,
            "value": shown,
            "likely_cause": cause,
            "last_good_checkpoint": last_good.path.name if last_good else None,
        }
        return TrainingDiverged(
            f"training diverged at step {step}: the {what} is {shown} (not finite); the run is marked failed "
            f"and {kept}. Likely cause: {cause}",
            hint="fix the cause and start a new run; the diverged weights were never applied or saved",
            figures=figures,
        )


def gradients_finite(model: Any) -> bool:
    """True when every gradient of a trainable parameter is finite (one device sync)."""
    import torch

    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    norms = torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
    return bool(torch.isfinite(norms).all())


def likely_cause(step: int, lr: float, dtype: str, scaler_gave_up: bool) -> str:
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
    import torch
    from safetensors import safe_open

    bad = []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = f.get_tensor(name)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    bad.append(name)
    return bad


def refuse_nonfinite(weights: Path) -> None:
    """A RunDirError when the run's final weights hold NaN or inf (a run that diverged)."""
    files = sorted(weights.glob("*.safetensors"))
    bad = nonfinite_tensors(files)
    if bad:
        raise RunDirError(
            f"the weights in {weights} hold NaN or inf in {len(bad)} tensor(s), e.g. {bad[0]}: "
            "the training diverged, so these weights are not a trained model",
            hint="train again with a lower train.lr (vlmtune now stops a run whose loss or gradients "
            "become NaN/inf and keeps its last good checkpoint)",
        )
