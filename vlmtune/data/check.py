"""`vlmtune data check`: the training pre-flight without loading model weights, and its verdict.

The check lists every problem, then says what `vlmtune train` would do with the same recipe: stop
(exit 2) on a problem the recipe's policies do not cover, or go on without the samples that
data.on_bad_sample: skip and data.too_long: drop leave out (exit 0, each one listed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vlmtune.data import SampleReader
from vlmtune.data.collator import VisionCollator
from vlmtune.data.lengths import TokenCounter
from vlmtune.data.preflight import CheckedSplit, scan_split
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection, Recipe


def sft_collator(recipe: Recipe) -> VisionCollator:
    """The collator training builds for this recipe's model (its processor, no weights)."""
    from vlmtune.model.checkpoint import detect
    from vlmtune.model.processing import load_processor

    path, family = detect(recipe.model.name, recipe.model.revision)
    processor = load_processor(path, family, recipe.data.max_image_pixels, revision=recipe.model.revision)
    return VisionCollator(
        processor, family, max_length=None, train_on_responses_only=recipe.data.train_on_responses_only
    )


def check_recipe_data(
    recipe: Recipe, console: Any = None, collator: VisionCollator | None = None
) -> dict[str, CheckedSplit]:
    """Every split of the recipe, measured as the model's processor builds it; problems listed, not raised."""
    collator = collator or sft_collator(recipe)
    processor, family = collator.processor, collator.family
    # SFT samples are measured from their image sizes; the other objectives read their own records
    # (pairs, prompts) and measure them with the processor.
    reader, measure = SampleReader, TokenCounter(collator)
    if recipe.train.objective == "dpo":  # preference pairs: both answers of every pair read and measured
        from vlmtune.data.preference_collator import pair_reading

        reader, measure = pair_reading(processor, family)
    elif (
        recipe.train.objective == "grpo"
    ):  # prompts: a sample's conversation before its answer, + completions
        from vlmtune.data.prompts import prompt_reading

        reader, measure = prompt_reading(processor, recipe.grpo)
    elif recipe.train.objective == "kto":  # unpaired answers: each with its good/bad label
        from vlmtune.data.unpaired_collator import unpaired_reading

        reader, measure = unpaired_reading(processor, family)
    # Collect every problem instead of stopping at the first: that is the point of a check.
    splits = {"train": recipe.data.train, "eval": recipe.data.eval}
    return {
        name: scan_split(name, source, recipe.data, recipe.train.max_length, measure, console, reader=reader)
        for name, source in splits.items()
        if source
    }


def render_report(reports: dict[str, CheckedSplit], data: DataSection, console: Any) -> None:
    """One table per split, then every problem (index, field, reason) and what training would do with it."""
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
        left_out = set(_left_out(report, data))
        dropped = set(report.too_long)
        for problem in report.problems:
            if problem not in left_out:
                mark = Text("  x ", style="red")
            else:
                mark = Text(f"  - {'dropped' if problem in dropped else 'skipped'} ", style="yellow")
            console.print(mark + Text(str(problem)), soft_wrap=True)
    if not all(r.samples for r in reports.values()):
        return  # nothing to train on: fail_on_problems says so
    if not any(report.problems for report in reports.values()):
        console.print(Text("every sample is usable", style="bold green"))
    elif not _blocking(reports, data):
        kept = ", ".join(f"{len(r.samples)} of {r.total} in {name}" for name, r in reports.items())
        console.print(
            Text(f"training would go on without the samples listed above: {kept}", style="bold yellow")
        )


def fail_on_problems(reports: dict[str, CheckedSplit], data: DataSection) -> None:
    """A DataError (exit 2) when training would stop: a problem the recipe's policies do not cover,
    a split with no sample at all, or one left empty. Skipped and dropped samples alone are no
    failure: training goes on."""
    blocking = _blocking(reports, data)
    if blocking:
        where = ", ".join(f"{n} in {name}" for name, n in blocking.items())
        raise DataError(
            f"{sum(blocking.values())} problem sample(s) ({where}), listed above with index, field and reason",
            hint=_fix(reports, data),
        )
    nothing = [f"{name} ({report.source})" for name, report in reports.items() if not report.total]
    if nothing:
        raise DataError(
            f"nothing to train on: no sample in {', '.join(nothing)}",
            hint="point data.train (and data.eval) at files that hold samples; docs/data.md shows the layouts "
            "vlmtune reads",
        )
    empty = [name for name, report in reports.items() if not report.samples]
    if empty:
        raise DataError(
            f"no usable samples in {', '.join(empty)}: every sample was skipped or dropped (listed above)",
            hint="fix the samples; docs/data.md shows the layouts vlmtune reads",
        )


def _left_out(report: CheckedSplit, data: DataSection) -> list:
    """The problems the recipe's policies leave out instead of stopping."""
    skipped = report.skipped if data.on_bad_sample == "skip" else []
    dropped = report.too_long if data.too_long == "drop" else []
    return [*skipped, *dropped]


def _blocking(reports: dict[str, CheckedSplit], data: DataSection) -> dict[str, int]:
    counts = {name: len(r.problems) - len(_left_out(r, data)) for name, r in reports.items()}
    return {name: n for name, n in counts.items() if n}


def _fix(reports: dict[str, CheckedSplit], data: DataSection) -> str:
    """The hint names only the policies that would change something."""
    policies = []
    if data.on_bad_sample == "error" and any(r.skipped for r in reports.values()):
        policies.append("data.on_bad_sample: skip")
    if data.too_long == "error" and any(r.too_long for r in reports.values()):
        policies.append("data.too_long: drop")
    return f"fix them; or set {' and '.join(policies)} to train without them " + (
        "(training lists them in 3-train/data_report.json)"
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
        ("measured by", report.measured_by or "-"),
        ("images per sample", _spread(images)),
        ("images", f"{summary['images_total']} in all; {summary['text_only_samples']} text-only sample(s)"),
        ("image check", "every pixel decoded" if report.image_check == "full" else "fast (data.image_check)"),
        (
            "over pixel budget",
            f"{summary['images_over_pixel_budget']} image(s) above {budget} pixels, resized down by the processor"
            if budget
            else "no budget (data.max_image_pixels: null)",
        ),
        (
            "multi-frame images",
            f"{summary['images_multi_frame']} animation(s) or multi-page TIFF(s), trained on their first frame "
            "(data.multi_frame_images)",
        ),
    ]


def _spread(stats: dict) -> str:
    if not stats:
        return "-"
    return " ".join(f"{k} {stats[k]}" for k in ("min", "p50", "p90", "p99", "max", "mean"))


# --- `data check --show N`: samples as the model sees them ------------------------------------------

LOSS_OPEN, LOSS_CLOSE = "\u27e6", "\u27e7"  # ⟦ ⟧ around the tokens that carry loss


@dataclass(frozen=True)
class Rendered:
    """One sample rendered through the chat template and the processor, as training batches it."""

    index: int
    pieces: list[tuple[str, str]]  # (text, kind): kind is "loss", "image" or "context"
    tokens: int
    image_tokens: int
    trained_tokens: int

    def plain(self) -> str:
        """The sample in one string: image-token runs folded, loss-carrying text inside ⟦ ⟧."""
        return "".join(
            f"{LOSS_OPEN}{text}{LOSS_CLOSE}" if kind == "loss" else text for text, kind in self.pieces
        )


def render_sample(collator: VisionCollator, sample: Any) -> Rendered:
    """The token ids a sample trains on, decoded in runs: image tokens folded into one mark per run."""
    batch = collator([sample])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    vision = set(collator.vision_ids.tolist())
    pieces: list[tuple[str, str]] = []
    run: list[int] = []
    kind: tuple = (None, None)

    def flush() -> None:
        if not run:
            return
        if kind[0] == "image":
            token = collator.tokenizer.convert_ids_to_tokens(run[0])
            pieces.append((token if len(run) == 1 else f"[{token} x{len(run)}]", "image"))
        else:
            pieces.append((collator.tokenizer.decode(run, skip_special_tokens=False), kind[0]))
        run.clear()

    for token, label in zip(ids, labels, strict=True):  # a run: one vision token repeated, or text alike
        current = ("image", token) if token in vision else ("loss" if label != -100 else "context", None)
        if current != kind:
            flush()
            kind = current
        run.append(token)
    flush()
    return Rendered(
        index=sample.index,
        pieces=pieces,
        tokens=len(ids),
        image_tokens=sum(token in vision for token in ids),
        trained_tokens=sum(label != -100 for label in labels),
    )


def trainable_tokens(collator: VisionCollator, samples: list) -> int:
    """Tokens that carry loss over a whole split (every sample collated: slow on large sets)."""
    return sum(int((collator([s])["labels"] != -100).sum()) for s in samples)


def show_samples(
    reports: dict[str, CheckedSplit], collator: VisionCollator, count: int, console: Any
) -> dict:
    """The first ``count`` usable samples of each split printed as the model sees them; returns the
    trainable tokens of each split."""
    from rich.text import Text

    styles = {"loss": "bold green", "image": "magenta", "context": ""}
    totals = {}
    for name, report in reports.items():
        for sample in report.samples[:count]:
            shown = render_sample(collator, sample)
            console.print(
                Text(
                    f"{name} sample {shown.index}: {shown.tokens} tokens, {shown.image_tokens} image tokens, "
                    f"{shown.trained_tokens} carry loss ({LOSS_OPEN} {LOSS_CLOSE})",
                    style="bold",
                )
            )
            text = Text()
            for piece, kind in shown.pieces:
                text.append(
                    f"{LOSS_OPEN}{piece}{LOSS_CLOSE}" if kind == "loss" else piece, style=styles[kind]
                )
            console.print(text, soft_wrap=True)
            console.print()
        totals[name] = trainable_tokens(collator, report.samples)
        console.print(
            f"{name}: {totals[name]:,} tokens carry loss over {len(report.samples)} usable samples",
            markup=False,
        )
    return totals
