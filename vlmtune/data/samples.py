"""The shape every dataset layout is read into, and the words for what is wrong with a sample.

A ``Sample`` holds ``messages`` whose content is always a list of ``{"type": "text", "text": ...}``
and ``{"type": "image"}`` parts, and ``images``: one lazy source per image part (an absolute path,
bytes, a PIL image, a URL, or a RowImage: a reference into an Arrow-backed dataset), opened only
when the pixels are needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmtune.errors import DataError


@dataclass
class Sample:
    index: int  # position in the source, for messages users can act on
    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    image_fields: list[str] = field(default_factory=list)  # where each image came from in the record
    format: str = "messages"  # the layout it was read as (vlmtune.choices.DataFormat, never "auto")
    # Messages before this index are the prompt: their assistant turns are context, never trained
    # (TRL's prompt/completion trains the completion only). 0: every assistant turn is trained.
    trained_from: int = 0

    @property
    def n_images(self) -> int:
        return len(self.images)

    def image_field(self, i: int) -> str:
        """Where image ``i`` came from in the record, for problem reports."""
        return self.image_fields[i] if i < len(self.image_fields) else f"images[{i}]"


@dataclass(frozen=True)
class Problem:
    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"sample {self.index}: {self.field}: {self.reason}"


class SampleError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):  # crosses process boundaries in the parallel pre-flight
        return type(self), (self.field, self.reason)


def invalid_samples_error(source: str, problems: list[Problem], total: int) -> DataError:
    listed = "\n".join(f"  - {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return DataError(
        f"{source}: {len(problems)} of {total} samples are invalid:\n{listed}{more}",
        hint="fix them (`vlmtune data check RECIPE` lists every one), or set data.on_bad_sample: skip to train "
        "without them (they are listed in 3-train/data_report.json)",
    )
