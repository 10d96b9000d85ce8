"""4-eval/report.html: the eval report as one self-contained page to open in a browser.

The scores (base vs trained) on top, then one card per sample: its images (embedded as data: URIs,
so the file travels alone), the prompt, the reference, and the base and trained answers side by
side with their per-answer scores. Mistakes come first: answers that miss the reference, the
furthest off (lowest ANLS) first. Every string is HTML-escaped; nothing is fetched from the network.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from vlmtune.data.prompts import EvalItem
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.scoring import METRICS

THUMBNAIL = 384  # longest side of an embedded image, in pixels

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
table.scores{border-collapse:collapse;margin-bottom:24px}
table.scores td,table.scores th{border:1px solid #ccc;padding:4px 10px;text-align:right}
table.scores th:first-child,table.scores td:first-child{text-align:left}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:12px;margin:12px 0}
.card.miss{border-left:6px solid #d33}.card.hit{border-left:6px solid #3a3}
.images img{max-height:240px;margin-right:8px;border:1px solid #eee}
.answers{display:grid;grid-template-columns:repeat(3,1fr);gap:10px}
.answers div{background:#f4f4f4;padding:6px;border-radius:4px;white-space:pre-wrap;word-break:break-word}
.label{font-size:12px;color:#666;display:block}
pre{white-space:pre-wrap;margin:4px 0}
"""


def image_uri(source: Any) -> str:
    """A PNG data: URI of an image source (path, URL-free bytes or PIL image), shrunk to THUMBNAIL."""
    from vlmtune.data import open_image

    image = open_image(source).convert("RGB")
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def mistakes_first(rows: list[dict]) -> list[int]:
    """Row positions: answers that miss the reference first, the lowest ANLS first; then the rest, in order."""

    def key(position: int) -> tuple:
        scores = rows[position].get("adapter_scores", {})
        return (scores.get("exact_match", 0.0) >= 1.0, scores.get("anls", 0.0), position)

    return sorted(range(len(rows)), key=key)


def _number(name: str, value: float | None) -> str:
    if value is None:
        return "–"
    metric = METRICS.get(name)
    return f"{value:.1%}" if metric is not None and metric.scale == "fraction" else f"{value:.3g}"


def _scores_table(content: dict, names: list[str]) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in names)
    rows = []
    for label, scores in (("base", content.get("base", {})), ("trained", content)):
        cells = "".join(f"<td>{_number(name, scores.get(name))}</td>" for name in names)
        rows.append(f"<tr><td>{label}</td>{cells}</tr>")
    return f'<table class="scores"><tr><th>model</th>{head}</tr>{"".join(rows)}</table>'


def _answer(label: str, text: str, scores: dict | None) -> str:
    detail = ", ".join(f"{name} {_number(name, value)}" for name, value in (scores or {}).items())
    return (
        f'<div><span class="label">{label}{" · " + html.escape(detail) if detail else ""}</span>'
        f"{html.escape(text)}</div>"
    )


def build(items: list[EvalItem], content: dict, title: str) -> str:
    """The page: ``content`` is eval_report.json's (its predictions in the order of ``items``)."""
    rows = content["predictions"]
    names = [name for name in METRICS if content.get(name) is not None]
    cards = []
    for position in mistakes_first(rows):
        row, item = rows[position], items[position]
        hit = row.get("adapter_scores", {}).get("exact_match", 0.0) >= 1.0
        images = "".join(
            f'<img alt="image {n} of sample {row["index"]}" src="{image_uri(source)}">'
            for n, source in enumerate(item.images)
        )
        cards.append(
            f'<div class="card {"hit" if hit else "miss"}" id="sample-{row["index"]}">'
            f'<span class="label">sample {row["index"]}</span>'
            f'<div class="images">{images}</div>'
            f"<pre>{html.escape(row['prompt'])}</pre>"
            '<div class="answers">'
            + _answer("reference", row["reference"], None)
            + _answer("base", row["base"], row.get("base_scores"))
            + _answer("trained", row["adapter"], row.get("adapter_scores"))
            + "</div></div>"
        )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{len(rows)} samples, mistakes first.</p>{_scores_table(content, names)}{''.join(cards)}"
        "</body></html>\n"
    )


def write(run: RunDir, items: list[EvalItem], content: dict, name: str = rundir.EVAL_HTML) -> Path:
    return run.write_text(name, build(items, content, f"eval of {Path(run.path).name}"))
