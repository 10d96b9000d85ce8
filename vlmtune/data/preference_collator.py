"""Preference pairs -> the batch TRL's DPOTrainer scores: chosen rows, then rejected rows.

Each pair becomes two SFT samples (the prompt with the chosen answer, the prompt with the rejected
one), collated by vlmtune's own collator, so every family's quirks (image tokens, structural
vision tokens, stop tokens, extra inputs, PaliGemma's prefix) are handled as in SFT and nothing is
ever cut. ``completion_mask`` marks exactly the tokens SFT would label on the final answer: the
answer and its end-of-turn, never the prompt, an earlier answer of a multi-turn prompt, an image
token or padding. The batch is [chosen_0 .. chosen_n, rejected_0 .. rejected_n], as TRL expects;
each pair's images are processed once per side, as TRL's own vision collator does.
"""

from __future__ import annotations

from typing import Any

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data.collator import VisionCollator
from vlmtune.data.preference import PairReader, PreferencePair
from vlmtune.model.families import Family

SIDES = ("chosen", "rejected")


class FinalAnswerCollator(VisionCollator):
    """Labels on the last assistant turn only: the answer a pair compares."""

    def __init__(self, processor: Any, family: Family, *, max_length: int | None):
        super().__init__(processor, family, max_length=max_length, train_on_responses_only=True)

    def assistant_spans(self, messages: list[dict], full_text: str) -> list[tuple[int, int]]:
        return super().assistant_spans(messages, full_text)[-1:]


class PreferenceCollator:
    def __init__(self, processor: Any, family: Family, *, max_length: int | None):
        self.answers = FinalAnswerCollator(processor, family, max_length=max_length)

    @property
    def max_length(self) -> int | None:
        return self.answers.max_length

    @max_length.setter
    def max_length(self, value: int | None) -> None:
        self.answers.max_length = value

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        batch = self.answers([pair.side(side) for side in SIDES for pair in pairs])
        labels = batch.pop("labels")
        batch["completion_mask"] = (labels != IGNORE_INDEX).long()
        return batch

    def count_tokens(self, pair: PreferencePair) -> int:
        """The longer side's length, image tokens included: what train.max_length must hold."""
        return max(self.answers.count_tokens(pair.side(side)) for side in SIDES)


def pair_reading(processor: Any, family: Family) -> tuple[type, Any]:
    """How the pre-flight reads a preference split: the pair reader, and the longer side's length."""
    return PairReader, PreferenceCollator(processor, family, max_length=None).count_tokens
