"""Pre-flight, the one reader of a whole split: read every sample, open every image, measure the
real token length (when a measure is given), apply the recipe's policies.

Training, `vlmtune data check` and eval all read through here, so a bad sample is reported the
same way everywhere and stops a run in its first minutes instead of an hour in. One sample at a
time: its images are decoded, checked, measured with the model's own processor and released
before the next sample, so a 100k-sample set costs the memory of one sample plus the list of
(lazy) samples kept. Every skipped or dropped sample is listed with its index, field and reason.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from vlmtune.data import Problem, Sample, SampleError, SampleReader, invalid_samples_error, open_records
from vlmtune.errors import DataError, VlmtuneError
from vlmtune.images import ImageProblem, open_image
from vlmtune.recipe import DataSection

Measure = Callable[[Sample], int]  # tokens of a sample whose images are decoded


@dataclass
class CheckedSplit:
    """What the pre-flight found in one split: the usable samples and every problem."""

    name: str
    source: str
    total: int
    samples: list[Sample]  # the usable ones, images still lazy
    skipped: list[Problem] = field(default_factory=list)
    too_long: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # tokens per kept sample; empty when not measured
    max_length: int | None = None
    formats: Counter = field(default_factory=Counter)
    images_over_budget: int = 0  # images the processor shrinks to data.max_image_pixels
    max_image_pixels: int | None = None

    @property
    def problems(self) -> list[Problem]:
        """Every skipped and dropped sample, in the order of the data."""
        return sorted([*self.skipped, *self.too_long], key=lambda p: p.index)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "samples_total": self.total,
            "samples_kept": len(self.samples),
            "skipped_invalid": [vars(p) for p in self.skipped],
            "dropped_too_long": [vars(p) for p in self.too_long],
            "formats": dict(self.formats),
            "max_length": self.max_length,
            "tokens": _percentiles(self.lengths),
            "images_per_sample": _percentiles([s.n_images for s in self.samples]),
            "images_total": sum(s.n_images for s in self.samples),
            "text_only_samples": sum(not s.images for s in self.samples),
            "max_image_pixels": self.max_image_pixels,
            "images_over_pixel_budget": self.images_over_budget,
        }


def _percentiles(values: list[int]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {
        "min": ordered[0],
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "max": ordered[-1],
        "mean": round(statistics.fmean(ordered), 1),
    }


# --- scanning ----------------------------------------------------------------------------------


def scan_split(
    name: str,
    source: str,
    data: DataSection,
    max_length: int | None = None,
    measure: Measure | None = None,
    console: Any = None,
    *,
    split: str | None = None,
    reader: Any = SampleReader,
) -> CheckedSplit:
    """Every sample of one split checked (and measured, given ``measure``); problems collected, never raised.

    ``measure`` gets the sample with its images already decoded (PIL images in place of the
    sources), so each image is decoded once; the kept sample keeps its lazy sources. Without it
    images are only checked to decode and no length limit applies. ``split`` names the split of
    a saved or hub dataset (default: the data section's train or eval split, after ``name``).
    ``reader``: the class that reads one record (SFT samples; vlmtune.data.preference.PairReader
    reads preference pairs, which the measure then gets).
    """
    if split is None:
        split = data.train_split if name == "train" else data.eval_split
    records = open_records(source, split, data.subset)
    reader = reader.from_section(data, records.root, records.table)
    report = CheckedSplit(
        name, records.source, 0, [], max_length=max_length, max_image_pixels=data.max_image_pixels
    )
    with _progress(console, f"checking {name}", records.total) as advance:
        for index, record in records.rows:
            report.total += 1
            advance()
            try:
                sample = reader.read(index, record)
                length, over_budget = _measure(sample, data, measure)
            except SampleError as exc:
                report.skipped.append(Problem(index, exc.field, exc.reason))
                continue
            report.formats[sample.format] += 1
            if length is not None and max_length is not None and length > max_length:
                reason = f"{length} tokens (image tokens included) > max_length {max_length}"
                report.too_long.append(Problem(index, "tokens", reason))
                continue
            report.samples.append(sample)
            if length is not None:
                report.lengths.append(length)
            report.images_over_budget += over_budget
    return report


def _measure(sample: Sample, data: DataSection, measure: Measure | None) -> tuple[int | None, int]:
    """(tokens or None, images over the pixel budget); every image decoded, checked and released here."""
    opened = []
    try:
        for i, source in enumerate(sample.images):
            try:
                opened.append(open_image(source, max_side=data.max_image_side))
            except ImageProblem as exc:
                raise SampleError(sample.image_field(i), exc.reason) from None
        budget = data.max_image_pixels
        over = sum(budget is not None and im.width * im.height > budget for im in opened)
        if measure is None:
            return None, over
        decoded = replace(sample, images=opened)
        try:
            return measure(decoded), over
        except VlmtuneError:
            raise
        except Exception as exc:  # the processor refuses what it cannot take (e.g. an extreme aspect ratio)
            raise SampleError("processor", f"the model's processor refused the sample ({exc})") from None
    finally:
        for image, source in zip(opened, sample.images, strict=False):
            if image is not source:
                image.close()
        opened.clear()


@contextmanager
def _progress(console: Any, label: str, total: int | None) -> Iterator[Callable[[], None]]:
    """A rich progress bar on a terminal (stderr by default); nothing when output is redirected."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = console or Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


# --- policies ----------------------------------------------------------------------------------


def check_split(
    name: str,
    path: str,
    data: DataSection,
    max_length: int | None = None,
    measure: Measure | None = None,
    console: Any = None,
    *,
    split: str | None = None,
    reader: Any = SampleReader,
) -> CheckedSplit:
    """Scan a split, then raise or drop per data.on_bad_sample / data.too_long (all problems at once)."""
    report = scan_split(name, path, data, max_length, measure, console, split=split, reader=reader)
    if report.skipped and data.on_bad_sample == "error":
        raise invalid_samples_error(report.source, report.skipped, report.total)
    if report.too_long and data.too_long == "error":
        first = report.too_long[0]
        raise DataError(
            f"{report.source}: {len(report.too_long)} sample(s) exceed train.max_length={max_length}; the first "
            f"is sample {first.index} ({first.reason})",
            hint="vlmtune never cuts image tokens: raise train.max_length, lower data.max_image_pixels, or set "
            "data.too_long: drop to train without them (they are listed in 3-train/data_report.json)",
        )
    if not report.samples:
        listed = "".join(f"\n  - {p}" for p in report.problems[:20])
        raise DataError(
            f"{report.source}: no usable samples: no sample is left to train on ({report.total} read){listed}",
            hint="`vlmtune data check RECIPE` lists every problem; docs/data.md shows the layouts vlmtune reads",
        )
    return report


def read_split(source: str, data: DataSection, *, split: str | None = None) -> CheckedSplit:
    """The usable samples of a source read with a recipe's data settings, images checked, no model.

    The recipe's bad-sample policy applies; lengths are not measured (that needs the processor).
    """
    return check_split("train", source, data, split=split or data.train_split)
