"""The trainer callback that adds the memory peaks (vlmtune/observe/memory.py) to every log."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from vlmtune.observe.memory import sample


class PeakMemory(TrainerCallback):
    """Adds the memory peaks to every log dict, for the callbacks after it to record."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.cuda:  # the first row's interval starts here, not at the load stage's own peak
            import torch

            torch.cuda.reset_peak_memory_stats()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs.update(sample(self.cuda))
