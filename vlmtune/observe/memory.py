"""Measured memory: each metrics.jsonl row's peak, and the run's peak beside the estimate.

Per logged row (the keys are stable; scripts read them), high-water marks of the process:
- ``peak_allocated_since_start_bytes``, ``peak_reserved_since_start_bytes`` (CUDA runs): torch's
  max_memory_allocated and max_memory_reserved;
- ``peak_rss_since_start_bytes`` (every run on Linux and macOS): the process's resident-memory
  high-water mark (VmHWM in /proc/self/status).
Each is the peak since the process started, so it only grows (unless other code in the process
resets it); the row where it jumps is the step that set a new peak. vlmtune never resets these
counters: they belong to the whole process, and the code around a run reads them after it
(Unsloth-style notebooks print max_memory_reserved after training, bench/gpu.py and
bench/compare.py take a run's peak from them), which a reset per row would silently cut to the last
interval.

summary.json's ``stages.train.memory`` compares the run's peak with 1-load/memory_estimate.json:
on CUDA the highest reserved figure; on CPU the RSS peak minus the RSS before the model loaded
(the interpreter and the libraries, ~0.5 GB, which the estimate does not count); both against the
estimate without its CUDA-context term, which neither figure includes.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vlmtune.observe.metrics import number
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir
from vlmtune.units import human_bytes

PEAK_ALLOCATED = "peak_allocated_since_start_bytes"
PEAK_RESERVED = "peak_reserved_since_start_bytes"
PEAK_RSS = "peak_rss_since_start_bytes"
KEYS = (PEAK_ALLOCATED, PEAK_RESERVED, PEAK_RSS)  # metrics.jsonl keys this module adds

_STATUS = Path("/proc/self/status")


def _status_bytes(field: str) -> int | None:
    """A /proc/self/status field (VmHWM, VmRSS) in bytes; None where there is no /proc (macOS, Windows)."""
    try:
        text = _STATUS.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    return None


def rss_high_water_mark() -> int | None:
    """The process's peak resident memory since it started, in bytes."""
    peak = _status_bytes("VmHWM")
    if peak is None and sys.platform == "darwin":
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS (KiB on Linux)
    return peak


def current_rss() -> int | None:
    return _status_bytes("VmRSS")


def sample(cuda: bool) -> dict[str, int]:
    """The high-water marks to add to one logged row. Reads only: no counter is reset."""
    row: dict[str, int] = {}
    if cuda:
        import torch

        row[PEAK_ALLOCATED] = torch.cuda.max_memory_allocated()
        row[PEAK_RESERVED] = torch.cuda.max_memory_reserved()
    rss = rss_high_water_mark()
    if rss is not None:
        row[PEAK_RSS] = rss
    return row


# --- the run's figure --------------------------------------------------------------------------------


def _highest(rows: list[dict], key: str) -> int | None:
    values = [number(row.get(key)) for row in rows]
    values = [v for v in values if v is not None]
    return int(max(values)) if values else None


def estimated_bytes(estimate: dict) -> int:
    """memory_estimate.json's peak without the CUDA context, which no measured figure here holds.

    A run spread over several GPUs compares against one GPU's share under its strategy.
    """
    figures = estimate.get("per_gpu", {}).get(estimate.get("strategy")) or estimate
    return int(figures["peak_bytes"] - figures["terms"]["overhead"])


def measured_peak(rows: list[dict], estimate: dict | None, rss_before_load: int | None) -> dict:
    """The run's peak beside the estimate; {} when no row carries a memory figure.

    ``ratio`` is (peak_bytes - baseline_bytes) / estimated_bytes: the measured share the estimate
    models. On CUDA the baseline is 0 (reserved memory holds tensors only); on CPU it is the RSS
    before the model loaded, when it is known.
    """
    reserved = _highest(rows, PEAK_RESERVED)
    rss = _highest(rows, PEAK_RSS)
    if reserved is not None:
        figures = {"device": "cuda", "peak_bytes": reserved, "peak_allocated_bytes": _highest(rows, PEAK_ALLOCATED),
                   "baseline_bytes": 0, "rss_peak_bytes": rss}  # fmt: skip
    elif rss is not None:
        figures = {"device": "cpu", "peak_bytes": rss, "baseline_bytes": rss_before_load}
    else:
        return {}
    estimated = estimated_bytes(estimate) if estimate else None
    baseline = figures["baseline_bytes"]
    figures["estimated_bytes"] = estimated
    figures["ratio"] = (
        round((figures["peak_bytes"] - baseline) / estimated, 3)
        if estimated and estimated > 0 and baseline is not None
        else None
    )
    return figures


def run_memory(run: RunDir, rows: list[dict]) -> dict:
    """measured_peak() with the run folder's estimate and floor (either may be missing)."""
    estimate = run.read_json(rundir.MEMORY_ESTIMATE) if (run / rundir.MEMORY_ESTIMATE).is_file() else None
    try:
        before = run.summary()["stages"]["load"].get(rundir.RSS_BEFORE_LOAD)
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    return measured_peak(rows, estimate, before)


def describe(figures: dict) -> str:
    """One line: the measured peak, the estimate and their ratio."""
    peak = figures["peak_bytes"]
    if figures["device"] == "cuda":
        allocated = figures.get("peak_allocated_bytes")
        measured = f"peak {human_bytes(peak)} reserved" + (
            f" ({human_bytes(allocated)} allocated)" if allocated is not None else ""
        )
    else:
        baseline = figures.get("baseline_bytes")
        measured = f"peak RSS {human_bytes(peak)}" + (
            f", {human_bytes(peak - baseline)} above the {human_bytes(baseline)} before loading"
            if baseline is not None
            else ""
        )
    estimated, ratio = figures.get("estimated_bytes"), figures.get("ratio")
    if estimated is None:
        return f"{measured}; no estimate"
    compared = f": measured/estimated {ratio:.2f}" if ratio is not None else ""
    return f"{measured}; estimated {human_bytes(estimated)}{compared}"
