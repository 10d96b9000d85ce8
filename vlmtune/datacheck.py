"""`vlmtune data check`: the training pre-flight without loading model weights."""

from __future__ import annotations

from typing import Any

from vlmtune.collator import VisionCollator
from vlmtune.preflight import SplitReport, check_split
from vlmtune.recipe import Recipe


def check_recipe_data(recipe: Recipe) -> dict[str, SplitReport]:
    """Every split of the recipe, measured with the model's own processor; problems listed, not raised."""
    from vlmtune.families import detect_family
    from vlmtune.processing import load_processor
    from vlmtune.stages.load import read_config, resolve_model_path

    path = resolve_model_path(recipe.model.name)
    family = detect_family(read_config(path, recipe.model.revision))
    processor = load_processor(path, family, recipe.data.max_image_pixels, revision=recipe.model.revision)
    collator = VisionCollator(
        processor, family, max_length=None, train_on_responses_only=recipe.data.train_on_responses_only
    )

    def measure(sample) -> int:
        return int(collator([sample])["attention_mask"].sum())

    # Collect every problem instead of stopping at the first: that is the point of a check.
    lenient = recipe.data.model_copy(update={"on_bad_sample": "skip", "too_long": "drop"})
    splits = {"train": recipe.data.train, "eval": recipe.data.eval}
    return {
        name: check_split(name, path_, lenient, recipe.train.max_length, measure)
        for name, path_ in splits.items()
        if path_
    }


def render_report(reports: dict[str, SplitReport], console: Any) -> None:
    from rich.table import Table

    for name, report in reports.items():
        summary = report.to_json()
        table = Table(title=f"{name}: {report.source}", show_header=True)
        for column in ("samples", "kept", "invalid", "too long", "tokens p50/p90/max", "images"):
            table.add_column(column)
        tokens = summary["tokens"]
        table.add_row(
            str(report.total),
            str(len(report.kept)),
            str(len(report.skipped)),
            str(len(report.too_long)),
            f"{tokens.get('p50', '-')}/{tokens.get('p90', '-')}/{tokens.get('max', '-')}",
            str(summary["images_total"]),
        )
        console.print(table)
        for problem in [*report.skipped, *report.too_long]:
            console.print(f"  [red]x[/] {problem}", markup=True, highlight=False)
