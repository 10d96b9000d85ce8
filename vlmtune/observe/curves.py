"""Curves of a run: the series metrics.jsonl holds, a PNG of them, and a few lines for a terminal.

Any objective's rows work. Loss, learning rate and gradient norm are always drawn; the panels
after them are the objective's own (token accuracy for SFT, rewards and preference accuracy for
DPO, reward and KL for GRPO), chosen by what the rows hold, never by the objective's name. Keys no
panel names are ignored, and a row without a loss (an eval row) feeds only the series it has.
matplotlib is imported inside the drawing functions, with the Agg canvas (no display, no pyplot
state): the CLI's other commands never pay for it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.observe.metrics import number


@dataclass(frozen=True)
class Series:
    key: str  # the metrics.jsonl key
    label: str  # the legend's word
    steps: tuple[int, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Panel:
    title: str
    keys: tuple[tuple[str, str], ...]  # (metrics.jsonl key, legend label), drawn in this order


# Drawn whatever was logged ("not logged" where nothing was).
CORE_PANELS = (
    Panel("loss", (("loss", "train"), ("eval_loss", "eval"))),
    Panel("learning rate", (("learning_rate", "learning rate"),)),
    Panel("gradient norm", (("grad_norm", "grad norm"),)),
)
# Drawn when logged; the first one stands in, empty, when none was (a run with no step yet).
OBJECTIVE_PANELS = (
    Panel("token accuracy", (("token_accuracy", "train"), ("eval_token_accuracy", "eval"))),
    Panel(
        "preference rewards",
        (("reward_chosen", "chosen"), ("reward_rejected", "rejected"), ("reward_margin", "margin")),
    ),
    Panel("preference accuracy", (("preference_accuracy", "train"), ("eval_preference_accuracy", "eval"))),
    Panel("reward", (("reward", "train"), ("eval_reward", "eval"))),
    Panel("kl", (("kl", "train"),)),
    # answers generated at train.eval_generate_steps (vlmtune.training.answer_eval)
    Panel(
        "answer scores",
        (
            ("eval_exact_match", "exact match"),
            ("eval_contains", "contains"),
            ("eval_number", "number"),
            ("eval_anls", "ANLS"),
            ("eval_rouge_l", "ROUGE-L"),
        ),
    ),  # fmt: skip
    Panel("answer error rates", (("eval_cer", "CER"), ("eval_wer", "WER"))),
    Panel("answer BLEU / chrF", (("eval_bleu", "BLEU"), ("eval_chrf", "chrF"))),
)
PANELS = CORE_PANELS + OBJECTIVE_PANELS


def series(rows: list[dict], key: str, label: str) -> Series:
    """The numeric values of ``key`` against their steps, in logged order (non-finite values kept)."""
    points = [(row["step"], number(row.get(key))) for row in rows]
    points = [(step, value) for step, value in points if value is not None]
    return Series(key, label, tuple(s for s, _ in points), tuple(v for _, v in points))


# --- noisy series in short: means over the first and last steps -------------------------------

MEAN_WINDOW = 10  # logged steps averaged at each end (fewer on short runs: a fifth of them, at least 1)


def window(count: int) -> int:
    """How many logged values each end's mean covers: 10, or a fifth of a short run (at least 1)."""
    return max(1, min(MEAN_WINDOW, count // 5))


def mean_ends(values: tuple[float, ...] | list[float]) -> tuple[float, float, int] | None:
    """(mean of the first N, mean of the last N, N) over the finite values; None when there are none.

    One step's loss or reward is noise on a tiny batch (a GRPO run's 0.5 -> 0.5 compared two single
    steps while its held-out reward rose); the means say where the run started and ended."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    n = window(len(finite))
    return sum(finite[:n]) / n, sum(finite[-n:]) / n, n


def smoothed(values: tuple[float, ...], size: int | None = None) -> tuple[float, ...]:
    """A trailing moving average (the mean of up to ``size`` values ending at each point; non-finite
    values skipped), for the line drawn over a noisy curve."""
    size = size or window(len(values))
    out, kept = [], []
    for v in values:
        if math.isfinite(v):
            kept.append(v)
        recent = kept[-size:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return tuple(out)


# Logged every step and noisy: summarised by mean_ends, drawn with a smoothed line.
NOISY = ("loss", "grad_norm", "token_accuracy", "reward", "reward_margin", "preference_accuracy", "kl",
         "reward_chosen", "reward_rejected")  # fmt: skip
SMOOTH_FROM = 20  # points: shorter curves are drawn as they are


def headline_means(rows: list[dict]) -> dict:
    """summary.json's figures of the noisy series: ``<key>_first_mean``, ``<key>_last_mean`` and
    ``mean_window`` (how many logged steps each mean covers)."""
    figures: dict = {}
    for key in ("loss", "reward", "preference_accuracy", "token_accuracy"):
        ends = mean_ends(series(rows, key, key).values)
        if ends is not None:
            figures[f"{key}_first_mean"], figures[f"{key}_last_mean"] = ends[0], ends[1]
            figures.setdefault("mean_window", ends[2])
    return figures


def extract(rows: list[dict]) -> dict[str, list[Series]]:
    """Panel title -> its series that have at least one value."""
    return {
        panel.title: [s for s in (series(rows, key, label) for key, label in panel.keys) if s.values]
        for panel in PANELS
    }


# --- the picture ---------------------------------------------------------------------------------

PANEL_SIZE = (5.5, 3.5)  # inches
DPI = 100  # so a panel is 550 x 350 pixels and the usual 2 x 2 picture 1100 x 700


def drawn_panels(curves: dict[str, list[Series]]) -> list[Panel]:
    """The core panels, then the objective's panels that have values (at least one, maybe empty)."""
    logged = [panel for panel in OBJECTIVE_PANELS if curves.get(panel.title)]
    return [*CORE_PANELS, *(logged or OBJECTIVE_PANELS[:1])]


def figure_size(panel_count: int) -> tuple[float, float]:
    """Two rows of panels, as many columns as they need."""
    columns = math.ceil(panel_count / 2)
    return (PANEL_SIZE[0] * columns, PANEL_SIZE[1] * 2)


def figure(curves: dict[str, list[Series]], title: str) -> Any:
    """A matplotlib Figure (Agg canvas) with the panels of ``drawn_panels``, two rows of them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = drawn_panels(curves)
    fig = Figure(figsize=figure_size(len(panels)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title)
    axes = fig.subplots(2, math.ceil(len(panels) / 2), squeeze=False).flat
    for ax, panel in zip(axes, panels, strict=False):
        ax.set_title(panel.title)
        drawn = curves.get(panel.title, [])
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for s in drawn:
            if (
                s.key in NOISY and len(s.values) >= SMOOTH_FROM
            ):  # the raw curve faint, its trend drawn over it
                (raw,) = ax.plot(s.steps, s.values, alpha=0.3, linewidth=1)
                ax.plot(s.steps, smoothed(s.values), color=raw.get_color(), linewidth=2,
                        label=f"{s.label} (mean of {window(len(s.values))})")  # fmt: skip
                continue
            # A lone point (one eval) would be an invisible line without a marker.
            ax.plot(
                s.steps, s.values, label=s.label, marker="o" if len(s.values) < 20 else None, markersize=3
            )
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if panel.title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(drawn) > 1 or any(s.key in NOISY and len(s.values) >= SMOOTH_FROM for s in drawn):
            ax.legend()
    for ax in list(fig.axes)[len(panels) :]:  # an odd count leaves the last slot empty
        fig.delaxes(ax)
    return fig


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_picture_target(path: Path, replace: bool) -> None:
    """Where `report --out` may draw: a new file, or (``replace``) an existing PNG; never a folder, never
    another kind of file (a run's adapter, a recipe) however it is named."""
    from vlmtune.errors import RunDirError

    path = Path(path)
    if path.is_dir():
        raise RunDirError(
            f"{path} is a folder; --out names the picture file to write",
            hint=f"give a file path, e.g. --out {path / 'curves.png'}",
        )
    if not path.exists() and not path.is_symlink():
        return
    try:
        with path.open("rb") as f:
            is_png = f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        is_png = False
    if not is_png:
        raise RunDirError(
            f"{path} exists and is not a PNG picture; vlmtune never overwrites it with one",
            hint="give --out a new file name (e.g. loss.png)",
        )
    if not replace:
        raise RunDirError(
            f"{path} already exists",
            hint="give --out a new file name, or add --force to replace that picture",
        )


def write_png(curves: dict[str, list[Series]], path: Path, title: str) -> Path:
    """Draw and write the picture atomically: a reader never sees half a PNG."""
    from vlmtune.errors import RunDirError

    fig = figure(curves, title)
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise RunDirError(
            f"cannot write the picture {path}: {exc.strerror or exc}",
            hint="give --out a path in a folder you can write to",
        ) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


# --- the terminal's summary ----------------------------------------------------------------------

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: tuple[float, ...], width: int = 24) -> str:
    """The curve's shape in block characters: at most ``width`` buckets (means); '!' marks NaN/inf."""
    if not values:
        return ""
    size = math.ceil(len(values) / width)
    buckets = [values[i : i + size] for i in range(0, len(values), size)]
    means = [sum(b) / len(b) if all(math.isfinite(v) for v in b) else math.nan for b in buckets]
    finite = [m for m in means if math.isfinite(m)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 0.0)
    span = (high - low) or 1.0
    return "".join(
        BARS[round((m - low) / span * (len(BARS) - 1))] if math.isfinite(m) else "!" for m in means
    )


def _g(value: float, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def _lowest(s: Series) -> tuple[float, int] | None:
    finite = [(v, step) for step, v in zip(s.steps, s.values, strict=True) if math.isfinite(v)]
    return min(finite) if finite else None


def _highest(s: Series) -> tuple[float, int] | None:
    finite = [(v, step) for step, v in zip(s.steps, s.values, strict=True) if math.isfinite(v)]
    return max(finite) if finite else None


def _trend(s: Series, digits: int = 4) -> str:
    """first -> last; for a noisy series logged often, the means of the first and last N steps."""
    ends = mean_ends(s.values) if s.key in NOISY and math.isfinite(s.values[-1]) else None  # nan stays seen
    if ends is None or ends[2] == 1:
        return f"{_g(s.values[0], digits)} -> {_g(s.values[-1], digits)}"
    return f"{_g(ends[0], digits)} -> {_g(ends[1], digits)} (means of the first and last {ends[2]} steps)"


def summary_lines(curves: dict[str, list[Series]]) -> list[tuple[str, str]]:
    """(label, text) lines for the series that were logged: the shape and the figures that matter."""
    by_key = {s.key: s for panel in curves.values() for s in panel}
    lines = []
    if loss := by_key.get("loss"):
        low = _lowest(loss)
        best = f" (min {_g(low[0])} at step {low[1]})" if low else ""
        lines.append(
            ("loss", f"{sparkline(loss.values)}  {_trend(loss)}{best}, {len(loss.values)} steps logged")
        )
    if ev := by_key.get("eval_loss"):
        low = _lowest(ev)
        best = f", best {_g(low[0])} at step {low[1]}" if low and len(ev.values) > 1 else ""
        count = f"{len(ev.values)} evaluation{'s' if len(ev.values) > 1 else ''}"
        lines.append(("eval loss", f"{_trend(ev)} ({count}{best})"))
    if lr := by_key.get("learning_rate"):
        lines.append(("learning rate", f"{lr.values[0]:.3g} -> {lr.values[-1]:.3g}"))
    if grad := by_key.get("grad_norm"):
        high = _highest(grad)
        peak = f" (max {high[0]:.3g} at step {high[1]})" if high else ""
        lines.append(("grad norm", f"{_trend(grad, 3)}{peak}"))
    if acc := by_key.get("token_accuracy"):
        lines.append(("token accuracy", _trend(acc, 3)))
    if eacc := by_key.get("eval_token_accuracy"):
        lines.append(("eval accuracy", _trend(eacc, 3)))
    if margin := by_key.get("reward_margin"):
        lines.append(("reward margin", _trend(margin, 3)))
    if pacc := by_key.get("preference_accuracy"):
        lines.append(("pref. accuracy", _trend(pacc, 3)))
    if reward := by_key.get("reward"):
        high = _highest(reward)
        best = f" (max {_g(high[0], 3)} at step {high[1]})" if high else ""
        lines.append(("reward", f"{sparkline(reward.values)}  {_trend(reward, 3)}{best}"))
    if ereward := by_key.get("eval_reward"):
        lines.append(("eval reward", _trend(ereward, 3)))
    if kl := by_key.get("kl"):
        lines.append(("kl", _trend(kl, 4)))
    return lines
