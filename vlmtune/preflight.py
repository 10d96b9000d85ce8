"""Pre-flight: read every sample, measure its real token length, apply the recipe's policies.

Runs before the model is trained (and alone in `vlmtune data check`), so a bad sample stops the
run in the first seconds instead of an hour in. Every dropped or skipped sample is listed.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field

from vlmtune.data import LoadedSplit, Problem, Sample, load_split
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection


@dataclass
class SplitReport:
    name: str
    source: str
    total: int
    kept: list[Sample]
    skipped: list[Problem] = field(default_factory=list)
    too_long: list[Problem] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "source": self.source,
            "samples_total": self.total,
            "samples_kept": len(self.kept),
            "skipped_invalid": [vars(p) for p in self.skipped],
            "dropped_too_long": [vars(p) for p in self.too_long],
            "tokens": _percentiles(self.lengths),
            "images_per_sample": _percentiles([s.n_images for s in self.kept]),
            "images_total": sum(s.n_images for s in self.kept),
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


def check_split(
    name: str,
    path: str,
    data: DataSection,
    max_length: int,
    measure: Callable[[Sample], int],
) -> SplitReport:
    """Load a split and measure each sample; raise or drop per data.on_bad_sample / data.too_long."""
    split: LoadedSplit = load_split(path, data.image_root, data.on_bad_sample)
    report = SplitReport(name, split.source, split.total, [], skipped=list(split.problems))
    for sample in split.samples:
        length = measure(sample)
        if length > max_length:
            report.too_long.append(
                Problem(sample.index, "tokens", f"{length} tokens (image tokens included) > max_length {max_length}")
            )
            continue
        report.kept.append(sample)
        report.lengths.append(length)
    if report.too_long and data.too_long == "error":
        first = report.too_long[0]
        raise DataError(
            f"{path}: {len(report.too_long)} sample(s) exceed train.max_length={max_length}; the first is "
            f"sample {first.index} ({first.reason})",
            hint="vlmtune never cuts image tokens: raise train.max_length, lower data.max_image_pixels, or set "
            "data.too_long: drop to train without them (they are listed in 3-train/data_report.json)",
        )
    if not report.kept:
        raise DataError(f"{path}: no sample is left to train on", hint="see the problems listed above")
    return report
