"""`vlmtune data check`: the training pre-flight without loading model weights."""

from __future__ import annotations

from typing import Any

from vlmtune.collator import VisionCollator
from vlmtune.data import SampleReader
from vlmtune.errors import DataError
from vlmtune.preflight import CheckedSplit, scan_split
from vlmtune.recipe import Recipe


def check_recipe_data(recipe: Recipe, console: Any = None) -> dict[str, CheckedSplit]:
    """Every split of the recipe, measured with the model's own processor; problems listed, not raised."""
    from vlmtune.checkpoint import detect
    from vlmtune.processing import load_processor

    path, family = detect(recipe.model.name, recipe.model.revision)
    processor = load_processor(path, family, recipe.data.max_image_pixels, revision=recipe.model.revision)
    collator = VisionCollator(
        processor, family, max_length=None, train_on_responses_only=recipe.data.train_on_responses_only
    )
    reader, measure = SampleReader, collator.count_tokens
    if recipe.train.objective == "dpo":  # preference pairs: both answers of every pair read and measured
        from vlmtune.stages.dpo import pair_reading

        reader, measure = pair_reading(processor, family)
    # Collect every problem instead of stopping at the first: that is the point of a check.
    splits = {"train": recipe.data.train, "eval": recipe.data.eval}
    return {
        name: scan_split(name, source, recipe.data, recipe.train.max_length, measure, console, reader=reader)
        for name, source in splits.items()
        if source
    }


def render_report(reports: dict[str, CheckedSplit], console: Any) -> None:
    """One table per split, then every problem (index, field, reason) and what training would do."""
    from rich.table import Table
    from rich.text import Text

    for name, report in reports.items():
        summary = report.to_json()
        table = Table(title=f"{name}: {report.source}", show_header=False, title_justify="left")
        table.add_column(style="bold")
        table.add_column()
        for key, value in _rows(report, summary):
            table.add_row(key, value)
        console.print(table)
        for problem in report.problems:
            console.print(Text("  x ", style="red") + Text(str(problem)), soft_wrap=True)
    if not any(report.problems for report in reports.values()) and all(r.samples for r in reports.values()):
        console.print(Text("every sample is usable", style="bold green"))


def fail_on_problems(reports: dict[str, CheckedSplit]) -> None:
    """A DataError (non-zero exit) when any split has a problem or nothing usable; the report above lists them."""
    empty = [
        f"{name} ({report.source}: {report.total} read)"
        for name, report in reports.items()
        if not report.samples
    ]
    if empty:
        raise DataError(
            f"nothing to train on: no usable sample in {', '.join(empty)}",
            hint="point data.train (and data.eval) at files that hold samples; problems, if any, are listed above",
        )
    counts = {name: len(report.problems) for name, report in reports.items() if report.problems}
    if counts:
        where = ", ".join(f"{n} in {name}" for name, n in counts.items())
        raise DataError(
            f"{sum(counts.values())} problem sample(s) ({where}), listed above with index, field and reason",
            hint="fix them; or set data.on_bad_sample: skip and data.too_long: drop to train without them "
            "(training lists them in 3-train/data_report.json)",
        )


def _rows(report: CheckedSplit, summary: dict) -> list[tuple[str, str]]:
    tokens, images = summary["tokens"], summary["images_per_sample"]
    formats = ", ".join(f"{n} {kind}" for kind, n in sorted(summary["formats"].items())) or "-"
    budget = summary["max_image_pixels"]
    return [
        ("samples", f"{report.total} read, {len(report.samples)} usable"),
        ("invalid", str(len(report.skipped))),
        ("too long", f"{len(report.too_long)} (max_length {report.max_length})"),
        ("layouts", formats),
        ("tokens", _spread(tokens)),
        ("images per sample", _spread(images)),
        ("images", f"{summary['images_total']} in all; {summary['text_only_samples']} text-only sample(s)"),
        (
            "over pixel budget",
            f"{summary['images_over_pixel_budget']} image(s) above {budget} pixels, resized down by the processor"
            if budget
            else "no budget (data.max_image_pixels: null)",
        ),
    ]


def _spread(stats: dict) -> str:
    if not stats:
        return "-"
    return " ".join(f"{k} {stats[k]}" for k in ("min", "p50", "p90", "p99", "max", "mean"))
