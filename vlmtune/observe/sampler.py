"""The trainer callback that adds the memory peaks (vlmtune/observe/memory.py) to every log."""

from __future__ import annotations

from typing import Any

from transformers import TrainerCallback

from vlmtune.observe.memory import sample


class PeakMemory(TrainerCallback):
    """Adds the memory high-water marks to every log dict, for the callbacks after it to record."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is not None:
            logs.update(sample(self.cuda))
