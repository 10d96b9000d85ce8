"""Unpaired preference data (train.objective: kto): one prompt (with its images), one answer, and a
label saying whether that answer is good or bad.

A record is any SFT layout (vlmtune.data.layouts: TRL's ``prompt`` / ``completion`` with ``images``,
OpenAI ``messages``, ShareGPT ``conversations``, ms-swift's ``query`` / ``response``, the columns of
``data.columns``) plus the label; the answer is the record's last assistant turn, the prompt is
everything before it. The label's key and words are those of the projects users come from:

- ``label``: TRL's KTO datasets (true/false), ms-swift's KTO sets;
- ``kto_tag``: LLaMA-Factory's KTO sets (true/false).

A bool, 1/0, or one of the words in ``GOOD`` / ``BAD``; anything else is refused with its value,
as is a record without a label, an answer that is empty, a completion of several turns, and a
preference pair (it has two answers: dpo reads it, or unpair it into one good and one bad record).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from vlmtune.data.layouts import SampleReader
from vlmtune.data.preference import looks_like_pair
from vlmtune.data.samples import Sample, SampleError

LABEL_KEYS = ("label", "kto_tag")  # TRL / ms-swift; LLaMA-Factory
GOOD = ("true", "1", "good", "desirable", "yes")
BAD = ("false", "0", "bad", "undesirable", "no")


@dataclass
class UnpairedAnswer(Sample):
    """An SFT sample whose last assistant turn is the answer, and whether that answer is desirable."""

    desirable: bool = True

    @property
    def answer(self) -> dict:
        return self.messages[-1]

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1]

    def answer_text(self) -> str:
        return "".join(part["text"] for part in self.answer["content"] if part["type"] == "text")

    def with_answer(self, other: UnpairedAnswer) -> Sample:
        """This prompt answered with ``other``'s answer: the mismatched sequence KTO's KL baseline scores."""
        return Sample(self.index, [*self.prompt, other.answer], self.images, self.image_fields, self.format)


@dataclass(frozen=True)
class UnpairedReader(SampleReader):
    """Reads a record of any SFT layout plus its good/bad label into an UnpairedAnswer."""

    def read(self, index: int, record: Any) -> UnpairedAnswer:
        if isinstance(record, dict):
            if looks_like_pair(record):
                raise SampleError(
                    "sample",
                    "a preference pair (two answers): kto trains on one answer and a good/bad label; use "
                    "train.objective: dpo for pairs, or write each pair as two records (chosen: label true, "
                    "rejected: label false)",
                )
            key, desirable = label_of(record)
            record = {k: v for k, v in record.items() if k != key}
        sample = super().read(index, record)
        check_answer(sample)
        return UnpairedAnswer(
            **{f.name: getattr(sample, f.name) for f in fields(Sample)}, desirable=desirable
        )


def label_of(record: dict) -> tuple[str, bool]:
    """(the label's key, whether the answer is good) of a record."""
    present = [key for key in LABEL_KEYS if key in record]
    if len(present) != 1:
        got = "none" if not present else " and ".join(f"`{key}`" for key in present)
        raise SampleError(
            "label",
            f"expected exactly one of {', '.join(f'`{k}`' for k in LABEL_KEYS)} (is the answer good?), got {got}",
        )
    key = present[0]
    value = record[key]
    if isinstance(value, bool):
        return key, value
    if isinstance(value, int) and value in (0, 1):
        return key, bool(value)
    word = value.strip().lower() if isinstance(value, str) else None
    if word in GOOD or word in BAD:
        return key, word in GOOD
    raise SampleError(
        key,
        f"{value!r} is not a label: expected true/false (or 1/0, {'/'.join(GOOD[2:])} vs {'/'.join(BAD[2:])})",
    )


def check_answer(sample: Sample) -> None:
    """The record ends with one non-empty assistant answer: the one the label judges."""
    last = sample.messages[-1]
    if last["role"] != "assistant":
        raise SampleError("sample", "the last turn must be the assistant answer the label judges")
    if sample.format == "prompt_completion" and len(sample.messages) - sample.trained_from != 1:
        raise SampleError(
            "completion",
            "expected one assistant turn: the label judges one answer (earlier turns go in the prompt)",
        )
    if not any(part.get("text", "").strip() for part in last["content"] if part["type"] == "text"):
        raise SampleError("sample", "the answer is empty: the label has nothing to judge")
