"""Generation on an eval set, before vs after: exact-match and contains-answer scores.

The reference answer is a sample's last assistant turn and the prompt is the conversation before
it (with the images shown there). The base is loaded once: the adapter's answers come first, then
peft's ``disable_adapter()`` gives the base model's answers from the same weights. Scores compare
normalised text (case, whitespace and trailing punctuation do not count).

A preference set (pairs, vlmtune.data.preference) is scored the same way against each pair's
chosen answer, and also by preference accuracy: the share of pairs whose chosen answer the model
gives a higher log-probability (summed over the answer's tokens, as DPO scores it) than the
rejected one, with ``logp_margin`` their mean difference in nats.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.data.prompts import EvalItem, eval_item, pair_item, prompt_text
from vlmtune.errors import DataError
from vlmtune.recipe import DataSection, ModelSection, TrainSection
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.scoring import (
    METRICS,
    answer_scores,
    contains_answer,
    exact_match,
    preference_scores,
    sample_scores,
    scores,
)

MAX_NEW_TOKENS = 64  # per answer; the CLI's --max-new-tokens overrides it


def holds_pairs(path: str, data: DataSection, split: str) -> bool:
    """Is this source a preference set? (its first record decides)"""
    from vlmtune.data import open_records
    from vlmtune.data.preference import looks_like_pair

    first = next(iter(open_records(path, split, data.subset).rows), (0, None))[1]
    return looks_like_pair(first)


def load_items(path: str, data: DataSection, max_samples: int | None) -> tuple[list, dict]:
    """Eval items of a data source read with the run's data settings (layout, columns, image root).

    A preference set gives one item per pair. Returns (items, {source, samples_total, skipped}).
    """
    from vlmtune.data.preference import PairReader
    from vlmtune.data.preflight import check_split, read_split

    split_name = data.eval_split if path == data.eval else data.train_split
    if holds_pairs(path, data, split_name):
        split = check_split("eval", path, data, split=split_name, reader=PairReader)
        pairs = split.samples[:max_samples] if max_samples else split.samples
        return [pair_item(p) for p in pairs], _source(split)
    split = read_split(path, data, split=split_name)
    samples = split.samples[:max_samples] if max_samples else split.samples
    if not any(m["role"] == "user" for s in samples for m in s.messages):
        raise DataError(
            f"{path} has no user turns to prompt with", hint="eval samples need a question and an answer"
        )
    return [eval_item(s) for s in samples], _source(split)


def _source(split: Any) -> dict:
    return {
        "source": split.source,
        "samples_total": split.total,
        "skipped": [str(p) for p in split.problems],
    }


# --- generation -------------------------------------------------------------------------------


def answers(
    model: Any, processor: Any, items: list[EvalItem], max_new_tokens: int, progress=None
) -> list[str]:
    from vlmtune.after.generate import generate_answer
    from vlmtune.data import open_image

    out = []
    for item in items:
        images = [open_image(source) for source in item.images]
        out.append(generate_answer(model, processor, item.messages, images, max_new_tokens))
        if progress is not None:
            progress()
    return out


def pair_logps(model: Any, processor: Any, pairs: list, batch_size: int = 4) -> list[tuple[float, float]]:
    """(chosen, rejected) summed answer log-probs of each pair, on exactly the tokens DPO scores."""

    from vlmtune.data.preference_collator import PreferenceCollator
    from vlmtune.model.families import detect_family

    collator = PreferenceCollator(processor, detect_family(model.config), max_length=None)
    out: list[tuple[float, float]] = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        rows = answer_logps(model, collator(chunk)).tolist()
        out += list(zip(rows[: len(chunk)], rows[len(chunk) :], strict=True))
    return out


def answer_logps(model: Any, batch: dict) -> Any:
    """Per row, the log-probability of its completion_mask tokens, each predicted from the ones before.

    Only those positions go through lm_head (vlmtune.training.loss's capture), in chunks: no full logits.
    """
    import torch

    from vlmtune.constants import LOSS_CHUNK_BYTES
    from vlmtune.training.loss import lm_head_input, logit_transform

    mask = batch.pop("completion_mask").to(model.device)
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in batch.items()}
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm_head = causal_lm.get_output_embeddings()
    transform = logit_transform(causal_lm.config)
    with torch.no_grad(), lm_head_input(lm_head) as captured:
        model(**inputs, use_cache=False)
    keep = mask[:, 1:].bool()
    states, targets = captured.hidden[:, :-1][keep], inputs["input_ids"][:, 1:][keep]
    rows = torch.arange(keep.shape[0], device=keep.device)[:, None].expand_as(keep)[keep]
    chunk = max(1, LOSS_CHUNK_BYTES // (4 * lm_head.weight.shape[0]))
    per_token = []
    with torch.no_grad():
        for at in range(0, states.shape[0], chunk):
            logits = lm_head(states[at : at + chunk]).float() * transform["scale"]
            if transform["softcap"] is not None:
                logits = torch.tanh(logits / transform["softcap"]) * transform["softcap"]
            per_token.append(logits.log_softmax(-1).gather(-1, targets[at : at + chunk, None])[:, 0])
    totals = torch.zeros(keep.shape[0], device=keep.device)
    return (totals.index_add_(0, rows, torch.cat(per_token)) if per_token else totals).cpu()


def measure(model: Any, processor: Any, items: list[EvalItem], max_new_tokens: int, progress=None) -> dict:
    """One model's answers, and for a preference set the log-probs of both answers of each pair."""
    found: dict[str, Any] = {"answers": answers(model, processor, items, max_new_tokens, progress)}
    pairs = [item.pair for item in items if item.pair is not None]
    if pairs:
        found["logps"] = pair_logps(model, processor, pairs)
    return found


def before_and_after(
    model: Any, processor: Any, items: list[EvalItem], max_new_tokens: int, progress=None
) -> dict:
    """The adapter measured, then the base from the same model with the adapter disabled."""
    adapter = measure(model, processor, items, max_new_tokens, progress)
    with model.disable_adapter():
        base = measure(model, processor, items, max_new_tokens, progress)
    return {"adapter": adapter, "base": base}


def run_answers(
    trained: Any, items: list[EvalItem], max_new_tokens: int, progress=None, against: str = "base"
) -> dict:
    """Adapter and base measured on a finished run (a trained.TrainedRun): one load with the adapter
    toggled, or, for a full fine-tune, the trained model and then the base.

    ``against="start"``: the "before" is the run this one trained on from (model.adapter), loaded as
    that run was trained, so a DPO or GRPO run is compared with the SFT run it started from."""
    from vlmtune.after.trained import load_for_inference, open_trained_run

    if against == "start":
        if trained.recipe.model.adapter is None:
            raise DataError(
                "this run did not train on from an earlier run (its model.adapter is empty)",
                hint="compare it with its base: vlmtune eval RUN_DIR --against base",
            )
        inference = load_for_inference(trained)
        after = measure(inference.model, inference.processor, items, max_new_tokens, progress)
        del inference
        start = trained.recipe.model  # the weights it started from: the same choice as start_from's
        earlier = load_for_inference(open_trained_run(start.adapter, start.adapter_checkpoint))
        return {
            "adapter": after,
            "base": measure(earlier.model, earlier.processor, items, max_new_tokens, progress),
        }
    inference = load_for_inference(trained)
    if inference.has_adapter:
        return before_and_after(inference.model, inference.processor, items, max_new_tokens, progress)
    adapter = measure(inference.model, inference.processor, items, max_new_tokens, progress)
    del inference  # free the fine-tuned weights before the base loads
    base = load_for_inference(trained, base_only=True)
    return {"adapter": adapter, "base": measure(base.model, base.processor, items, max_new_tokens, progress)}


def report(items: list[EvalItem], found: dict, train: TrainSection | None = None, **facts: Any) -> dict:
    """The eval_report.json content: scores after (top level) and before (under `base`), per sample.

    ``found`` is what ``before_and_after`` / ``run_answers`` measured of the adapter and the base;
    ``train``: the run's train section, whose metrics (train.metrics, the number tolerances) are reported
    beside exact match and contains (all of them when None).
    """
    references = [item.reference for item in items]
    adapter, base = found["adapter"], found["base"]
    after = scores(adapter["answers"], references)
    before = scores(base["answers"], references)
    measure_with = _metric_options(train)
    after.update(answer_scores(adapter["answers"], references, **measure_with))
    before.update(answer_scores(base["answers"], references, **measure_with))
    if "logps" in adapter:
        after.update(preference_scores(adapter["logps"]))
        before.update(preference_scores(base["logps"]))
    content = {
        **after,
        "base": before,
        "n": len(items),
        **facts,
        "predictions": [
            prediction(item, a, b, at, bt)
            for item, a, b, at, bt in zip(
                items,
                adapter["answers"],
                base["answers"],
                _each(adapter.get("logps"), items),
                _each(base.get("logps"), items),
                strict=True,
            )
        ],  # fmt: skip
    }
    for row, item in zip(content["predictions"], items, strict=True):  # each answer's own scores
        for who in ("adapter", "base"):
            row[f"{who}_scores"] = {
                "exact_match": float(exact_match(row[who], item.reference)),
                "contains": float(contains_answer(row[who], item.reference)),
                **sample_scores(row[who], item.reference, **measure_with),
            }
    return content


def _metric_options(train: TrainSection | None) -> dict:
    """The answer metrics beyond exact match and contains (which ``scores`` always gives), as the run chose."""
    names = train.metrics if train is not None else list(METRICS)
    return {
        "names": [name for name in names if name not in ("exact_match", "contains")],
        "tolerance": train.number_tolerance if train is not None else 0.0,
        "relative_tolerance": train.number_relative_tolerance if train is not None else 0.0,
    }


def prediction(item: EvalItem, adapter: str, base: str, adapter_logps: Any, base_logps: Any) -> dict:
    row = {
        "index": item.index,
        "prompt": prompt_text(item.messages),
        "reference": item.reference,
        "base": base,
        "adapter": adapter,
    }
    if item.pair is not None:  # which answer each model finds likelier
        row["rejected"] = item.pair.answer_text("rejected")
        row["adapter_prefers_chosen"] = adapter_logps[0] > adapter_logps[1]
        row["base_prefers_chosen"] = base_logps[0] > base_logps[1]
    return row


def _each(logps: list | None, items: list) -> list:
    return logps if logps is not None else [None] * len(items)


def write_report(run: RunDir, content: dict) -> Path:
    """4-eval/eval_report.json: the eval stage's report (a new run folder has none yet)."""
    return run.write_json(rundir.EVAL_REPORT, content)


def write_new_report(run: RunDir, content: dict, label: str | None = None) -> Path:
    """A report beside the others, never over one: eval_report.json when the folder has none, else
    eval_report-LABEL.json (the data file's stem), numbered when that is taken too."""
    return run.write_json(free_report_name(run, label), content)


def free_report_name(run: RunDir, label: str | None) -> str:
    import re

    first = Path(rundir.EVAL_REPORT)
    if label is None and not (run / rundir.EVAL_REPORT).exists():
        return rundir.EVAL_REPORT
    stem = first.stem + (f"-{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}" if label else "")
    for number in range(1, 10_000):
        name = str(first.with_name(f"{stem}{'' if number == 1 else f'-{number}'}{first.suffix}"))
        if not (run / name).exists():
            return name
    raise DataError(f"{run.path / first.parent} holds 10,000 eval reports", hint="remove some old ones")


# --- the optional stage after training ----------------------------------------------------------


def after_training(
    model: Any,
    processor: Any,
    model_section: ModelSection,
    data: DataSection,
    run: RunDir,
    train: TrainSection | None = None,
) -> dict:
    """Stage 4 (train.eval_generate): score data.eval before vs after; figures for summary.json."""
    if not data.eval:
        return {"skipped": "train.eval_generate is on but data.eval is empty"}
    items, source = load_items(data.eval, data, None)
    model.eval()
    if hasattr(model, "disable_adapter"):
        found = before_and_after(model, processor, items, MAX_NEW_TOKENS)
    else:  # a full fine-tune: the base is a second model
        found = {"adapter": measure(model, processor, items, MAX_NEW_TOKENS)}
        found["base"] = base_measure(model_section, data, items, model.device.type)
    content = report(items, found, train, max_new_tokens=MAX_NEW_TOKENS, data=source)
    write_report(run, content)
    write_html(run, items, content)
    return headline(content)


def write_html(run: RunDir, items: list[EvalItem], content: dict, report: str = rundir.EVAL_REPORT) -> Path:
    """The report as one page beside its JSON (vlmtune.after.report_html): 4-eval/report.html for
    eval_report.json, report-LABEL.html for eval_report-LABEL.json, so a page is never overwritten either."""
    from vlmtune.after import report_html

    return report_html.write(run, items, content, html_name(report))


def html_name(report: str) -> str:
    """The page's name for a JSON report's name (rundir.EVAL_HTML for rundir.EVAL_REPORT)."""
    suffix = Path(report).stem[len(Path(rundir.EVAL_REPORT).stem) :]
    html = Path(rundir.EVAL_HTML)
    return str(html.with_name(f"{html.stem}{suffix}{html.suffix}"))


def base_measure(model_section: ModelSection, data: DataSection, items: list[EvalItem], device: str) -> dict:
    """The untrained base measured, loaded unquantized as a full fine-tune trains it."""
    from vlmtune.recipe import QuantizationSection
    from vlmtune.stages import load

    base = load.load(model_section, QuantizationSection(bits=None), data.max_image_pixels, device)
    base.model.eval()
    return measure(base.model, base.processor, items, MAX_NEW_TOKENS)


def headline(content: dict) -> dict:
    figures = {"n": content["n"]}
    for key in ("exact_match", "contains", "preference_accuracy"):
        if key in content:
            figures[key] = content[key]
            figures[f"base_{key}"] = content["base"][key]
    return figures


# --- rendering --------------------------------------------------------------------------------


def render(content: dict, console: Any, show: int = 8) -> None:
    """A score table (base vs adapter) and the first ``show`` predictions."""
    from rich.table import Table

    columns = {"exact_match": "exact match", "contains": "contains answer"}
    if "preference_accuracy" in content:
        columns["preference_accuracy"] = "preference accuracy"
    scores_table = Table(title=f"eval on {content['n']} samples", title_justify="left")
    scores_table.add_column("model")
    for title in columns.values():
        scores_table.add_column(title, justify="right")
    before, after = content["base"], content
    label = f"before ({content.get('before', 'base')})"
    scores_table.add_row(label, *(f"{before[key]:.1%}" for key in columns))
    scores_table.add_row("[bold]after (trained)[/]", *(f"[bold]{after[key]:.1%}[/]" for key in columns))
    console.print(scores_table)
    _render_metrics(content, console)
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


def render_answers(items: list[EvalItem], found: list[str], console: Any, show: int = 8) -> None:
    """One model's first ``show`` answers beside the references."""
    from rich.table import Table

    table = Table(title=f"first {min(show, len(items))} answers", title_justify="left", show_lines=True)
    for column in ("#", "prompt", "reference", "answer"):
        table.add_column(column, overflow="fold")
    for item, answer in list(zip(items, found, strict=True))[:show]:
        mark = "[green]✓[/] " if exact_match(answer, item.reference) else ""
        table.add_row(
            str(item.index), _plain(prompt_text(item.messages)), _plain(item.reference), mark + _plain(answer)
        )
    console.print(table)


def _plain(text: str) -> str:
    """Rich markup escaped, control characters (random models emit them) written as escapes (\\x1b)."""
    from rich.markup import escape

    from vlmtune.after.generate import printable

    return escape(printable(text))


def _render_metrics(content: dict, console: Any) -> None:
    """The answer metrics beyond exact match and contains, base vs trained (vlmtune.scoring)."""
    from rich.table import Table

    names = [n for n in METRICS if n not in ("exact_match", "contains") and content.get(n) is not None]
    if not names:
        return
    table = Table(title="answer metrics", title_justify="left")
    table.add_column("model")
    for name in names:
        arrow = "↑" if METRICS[name].greater_is_better else "↓"
        table.add_column(f"{name} {arrow}", justify="right")

    def shown(name: str, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.1%}" if METRICS[name].scale == "fraction" else f"{value:.3g}"

    table.add_row("before (base)", *(shown(n, content["base"].get(n)) for n in names))
    table.add_row("[bold]after (trained)[/]", *(f"[bold]{shown(n, content.get(n))}[/]" for n in names))
    console.print(table)
