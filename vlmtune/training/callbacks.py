"""Trainer callbacks: metrics.jsonl rows with stable keys, and a rich progress bar."""

from __future__ import annotations

import re
from typing import Any

from transformers import TrainerCallback

from vlmtune.observe import memory
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir

# Trainer log keys -> our stable keys (scripts read metrics.jsonl; keep these names).
KEYS = {
    "loss": "loss",
    "learning_rate": "learning_rate",
    "epoch": "epoch",
    "grad_norm": "grad_norm",
    "mean_token_accuracy": "token_accuracy",
    "padding_fraction": "padding_fraction",
    # per optimizer step on this rank (sft): real (non-pad) tokens and samples trained on
    "real_tokens": "real_tokens",
    "samples": "samples",
    # online RL (grpo): rewards of the sampled completions, their spread, the drift from the start
    "reward": "reward",
    "reward_std": "reward_std",
    "reward_group_std": "reward_group_std",
    "frac_reward_zero_std": "groups_zero_spread",
    "kl": "kl",
    "entropy": "entropy",
    "completions/mean_length": "completion_length",
    "completions/max_length": "completion_length_max",
    "completions/clipped_ratio": "completions_clipped",
    "clip_ratio/region_mean": "clip_ratio",
    **{key: key for key in memory.KEYS},  # peak memory since the previous row (vlmtune/observe/memory.py)
    # preference tuning (dpo): rewards are beta x log(p / p_reference) of each answer
    "rewards/chosen": "reward_chosen",
    "rewards/rejected": "reward_rejected",
    "rewards/margins": "reward_margin",
    "rewards/accuracies": "preference_accuracy",
    "logps/chosen": "logp_chosen",
    "logps/rejected": "logp_rejected",
    "eval_rewards/chosen": "eval_reward_chosen",
    "eval_rewards/rejected": "eval_reward_rejected",
    "eval_rewards/margins": "eval_reward_margin",
    "eval_rewards/accuracies": "eval_preference_accuracy",
    "eval_logps/chosen": "eval_logp_chosen",
    "eval_logps/rejected": "eval_logp_rejected",
}
# Keys named after something of the run (a grpo reward's name) -> our key.
PATTERNS = (
    (re.compile(r"rewards/(\w+)/mean"), "reward_{}"),
    # each optimizer group's rate (train.lr_vision & co., LoRA+: vlmtune.training.param_groups)
    (re.compile(r"learning_rate_(\w+)"), "learning_rate_{}"),
)


class MetricsWriter(TrainerCallback):
    """One JSON object per logged step: step, loss, learning_rate, epoch (eval rows: eval_loss)."""

    def __init__(self, run: RunDir):
        self.run = run

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs:
            return
        row: dict[str, Any] = {"step": state.global_step, **stable_row(logs)}
        if len(row) > 1 and any(key == "loss" or key.startswith("eval_") for key in row):
            self.run.append_jsonl(rundir.METRICS, row)


def stable_row(logs: dict) -> dict[str, Any]:
    """A Trainer log row under our metrics.jsonl names (keys we do not keep left out)."""
    row: dict[str, Any] = {}
    for key, value in logs.items():
        name = stable_key(key)
        if name is None and key.startswith("eval_"):
            rest = stable_key(key[5:])  # an eval row keeps its train row's names, and eval_runtime & co.
            name = f"eval_{rest}" if rest else (key if "/" not in key else None)
        if name is not None:
            row[name] = _plain(value)
    return row


def stable_key(key: str) -> str | None:
    """Our metrics.jsonl name of a Trainer log key (None: not kept)."""
    if key in KEYS:
        return KEYS[key]
    for pattern, template in PATTERNS:
        found = pattern.fullmatch(key)
        if found:
            return template.format(*found.groups())
    return None


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


class RichProgress(TrainerCallback):
    """A progress bar with the latest loss, instead of tqdm."""

    def __init__(self, console: Any):
        self.console = console
        self.progress = None
        self.task = None
        self.loss: float | None = None
        self.epochs: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.epochs = planned_epochs(args, state, kwargs.get("train_dataloader"))
        if self.epochs is not None:
            self.console.print(epochs_line(state.max_steps, args, self.epochs))
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=state.max_steps, completed=state.global_step, loss="-", epoch=self._epoch(state)
        )

    def _epoch(self, state: Any) -> str:
        done = f"{state.epoch or 0:.2f}"
        return f"{done}/{self.epochs:.2f}" if self.epochs is not None else done

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs and "loss" in logs and self.progress is not None:
            shown = f"{_plain(logs['loss']):.4f}"
            if logs.get("reward") is not None:  # grpo: the reward is the curve to watch
                shown += f" reward {_plain(logs['reward']):.3f}"
            self.progress.update(self.task, loss=shown)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, epoch=self._epoch(state))

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Stop the bar (and give the terminal its cursor back); also when training ends by an exception."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def planned_epochs(args: Any, state: Any, dataloader: Any) -> float | None:
    """Passes over the training set the run will make, counted as the Trainer counts its `epoch`:
    steps x grad_accum / batches per epoch (GRPO's repeated prompts and DDP's shards included)."""
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return state.max_steps * args.gradient_accumulation_steps / batches if batches else None


def epochs_line(steps: int, args: Any, epochs: float) -> str:
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(args.world_size, 1)
    return f"{steps} steps of effective batch {per_step} = {epochs:.2f} epochs of the training set"


class StepCounter(TrainerCallback):
    """Keeps the last finished step in a stage's figures, so an interrupted run can say where it was."""

    def __init__(self, figures: dict):
        self.figures = figures

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.figures["last_step"] = state.global_step
