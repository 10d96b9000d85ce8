"""Generation on an eval set, before vs after: exact-match and contains-answer scores.

The reference answer is a sample's last assistant turn and the prompt is the conversation before
it (with the images shown there). The base is loaded once: the adapter's answers come first, then
peft's ``disable_adapter()`` gives the base model's answers from the same weights. Scores compare
normalised text (case, whitespace and trailing punctuation do not count).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune import rundir
from vlmtune.data import Sample
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection, ModelSection
from vlmtune.rundir import RunDir

MAX_NEW_TOKENS = 64  # per answer; the CLI's --max-new-tokens overrides it
_TRAILING = re.compile(r"[\s.!?,;:。！？]+$")


@dataclass(frozen=True)
class EvalItem:
    index: int  # the sample's position in its file
    messages: list[dict]  # the conversation before the reference answer
    images: list[Any]  # the image sources those messages show
    reference: str


# --- scoring (pure) ---------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, single spaces, no trailing punctuation."""
    return _TRAILING.sub("", " ".join(text.lower().split()))


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


def contains_answer(prediction: str, reference: str) -> bool:
    reference = normalize(reference)
    return bool(reference) and reference in normalize(prediction)


def scores(predictions: list[str], references: list[str]) -> dict:
    n = len(references)
    return {
        "exact_match": sum(map(exact_match, predictions, references)) / n if n else 0.0,
        "contains": sum(map(contains_answer, predictions, references)) / n if n else 0.0,
    }


# --- items ------------------------------------------------------------------------------------


def eval_item(sample: Sample) -> EvalItem:
    """Split a sample at its last assistant turn: (prompt conversation, images shown, reference)."""
    last = max(i for i, m in enumerate(sample.messages) if m["role"] == "assistant")
    prompt = sample.messages[:last]
    shown = sum(part["type"] == "image" for message in prompt for part in message["content"])
    reference = "".join(p["text"] for p in sample.messages[last]["content"] if p["type"] == "text")
    return EvalItem(sample.index, prompt, sample.images[:shown], reference)


def prompt_text(messages: list[dict]) -> str:
    """A readable one-string prompt for the report: `user: <image> What color ...`."""
    lines = []
    for message in messages:
        parts = ["<image>" if p["type"] == "image" else p["text"] for p in message["content"]]
        lines.append(f"{message['role']}: {' '.join(parts)}")
    return "\n".join(lines)


def load_items(path: str, data: DataSection, max_samples: int | None) -> tuple[list, dict]:
    """Eval items of a data source read with the run's data settings (layout, columns, image root).

    Returns (items, {source, samples_total, skipped}).
    """
    from vlmtune.preflight import read_split

    split = read_split(path, data, split=data.eval_split if path == data.eval else data.train_split)
    samples = split.samples[:max_samples] if max_samples else split.samples
    if not any(m["role"] == "user" for s in samples for m in s.messages):
        raise DataError(
            f"{path} has no user turns to prompt with", hint="eval samples need a question and an answer"
        )
    source = {
        "source": split.source,
        "samples_total": split.total,
        "skipped": [str(p) for p in split.problems],
    }
    return [eval_item(s) for s in samples], source


# --- generation -------------------------------------------------------------------------------


def answers(
    model: Any, processor: Any, items: list[EvalItem], max_new_tokens: int, progress=None
) -> list[str]:
    from vlmtune.data import open_image
    from vlmtune.generate import generate_answer

    out = []
    for item in items:
        images = [open_image(source) for source in item.images]
        out.append(generate_answer(model, processor, item.messages, images, max_new_tokens))
        if progress is not None:
            progress()
    return out


def before_and_after(
    model: Any, processor: Any, items: list[EvalItem], max_new_tokens: int, progress=None
) -> dict:
    """Adapter answers, then base answers from the same model with the adapter disabled."""
    adapter = answers(model, processor, items, max_new_tokens, progress)
    with model.disable_adapter():
        base = answers(model, processor, items, max_new_tokens, progress)
    return {"adapter": adapter, "base": base}


def run_answers(trained: Any, items: list[EvalItem], max_new_tokens: int, progress=None) -> dict:
    """Adapter and base answers of a finished run (a trained.TrainedRun): one load with the adapter
    toggled, or, for a full fine-tune, the trained model and then the base."""
    from vlmtune.trained import load_for_inference

    inference = load_for_inference(trained)
    if inference.has_adapter:
        return before_and_after(inference.model, inference.processor, items, max_new_tokens, progress)
    adapter = answers(inference.model, inference.processor, items, max_new_tokens, progress)
    del inference  # free the fine-tuned weights before the base loads
    base = load_for_inference(trained, base_only=True)
    return {"adapter": adapter, "base": answers(base.model, base.processor, items, max_new_tokens, progress)}


def report(items: list[EvalItem], adapter: list[str], base: list[str], **facts: Any) -> dict:
    """The eval_report.json content: scores after (top level) and before (under `base`), per sample."""
    references = [item.reference for item in items]
    return {
        **scores(adapter, references),
        "base": scores(base, references),
        "n": len(items),
        **facts,
        "predictions": [
            {
                "index": item.index,
                "prompt": prompt_text(item.messages),
                "reference": item.reference,
                "base": b,
                "adapter": a,
            }
            for item, a, b in zip(items, adapter, base, strict=True)
        ],
    }


def write_report(run: RunDir, content: dict) -> Path:
    return run.write_json(rundir.EVAL_REPORT, content)


# --- the optional stage after training ----------------------------------------------------------


def after_training(
    model: Any, processor: Any, model_section: ModelSection, data: DataSection, run: RunDir
) -> dict:
    """Stage 4 (train.eval_generate): score data.eval before vs after; figures for summary.json."""
    if not data.eval:
        return {"skipped": "train.eval_generate is on but data.eval is empty"}
    items, source = load_items(data.eval, data, None)
    model.eval()
    if hasattr(model, "disable_adapter"):
        found = before_and_after(model, processor, items, MAX_NEW_TOKENS)
    else:  # a full fine-tune: the base is a second model
        found = {"adapter": answers(model, processor, items, MAX_NEW_TOKENS)}
        found["base"] = base_answers(model_section, data, items, model.device.type)
    content = report(items, found["adapter"], found["base"], max_new_tokens=MAX_NEW_TOKENS, data=source)
    write_report(run, content)
    return headline(content)


def base_answers(
    model_section: ModelSection, data: DataSection, items: list[EvalItem], device: str
) -> list[str]:
    """Answers of the untrained base, loaded unquantized as a full fine-tune trains it."""
    from vlmtune.recipe import QuantizationSection
    from vlmtune.stages import load

    base = load.load(model_section, QuantizationSection(bits=None), data.max_image_pixels, device)
    base.model.eval()
    return answers(base.model, base.processor, items, MAX_NEW_TOKENS)


def headline(content: dict) -> dict:
    return {
        "n": content["n"],
        "exact_match": content["exact_match"],
        "contains": content["contains"],
        "base_exact_match": content["base"]["exact_match"],
        "base_contains": content["base"]["contains"],
    }


# --- rendering --------------------------------------------------------------------------------


def render(content: dict, console: Any, show: int = 8) -> None:
    """A score table (base vs adapter) and the first ``show`` predictions."""
    from rich.table import Table

    scores_table = Table(title=f"eval on {content['n']} samples", title_justify="left")
    scores_table.add_column("model")
    scores_table.add_column("exact match", justify="right")
    scores_table.add_column("contains answer", justify="right")
    before, after = content["base"], content
    scores_table.add_row("before (base)", f"{before['exact_match']:.1%}", f"{before['contains']:.1%}")
    scores_table.add_row(
        "[bold]after (trained)[/]",
        f"[bold]{after['exact_match']:.1%}[/]",
        f"[bold]{after['contains']:.1%}[/]",
    )
    console.print(scores_table)
    rows = content["predictions"][:show]
    if not rows:
        return
    table = Table(title=f"first {len(rows)} predictions", title_justify="left", show_lines=True)
    for column in ("#", "prompt", "reference", "base", "adapter"):
        table.add_column(column, overflow="fold")
    for row in rows:
        mark = "[green]✓[/] " if exact_match(row["adapter"], row["reference"]) else ""
        table.add_row(
            str(row["index"]), _plain(row["prompt"]), _plain(row["reference"]), _plain(row["base"][:120]),
            mark + _plain(row["adapter"]),
        )  # fmt: skip
    console.print(table)


def _plain(text: str) -> str:
    """Rich markup escaped, control characters (random models emit them) shown as �."""
    from rich.markup import escape

    return escape("".join(c if c.isprintable() or c == "\n" else "\N{REPLACEMENT CHARACTER}" for c in text))
