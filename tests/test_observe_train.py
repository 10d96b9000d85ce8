"""A real tiny run with TensorBoard: measured memory in every row and in summary.json, the curves
picture, the event files read back offline, `vlmtune runs` on it, and a quiet stderr."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vlmtune.observe.metrics import read_rows
from vlmtune.runs import rundir

from conftest import ROOT
from test_cli import vlmtune
from test_observe import RUN_KEYS, png_size

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("observe")
    run = folder / "runs" / "tb"
    result = vlmtune(
        "train", str(ROOT / "recipes" / "demo.yaml"), "--run-dir", str(run),
        "--set", "train.max_steps=6", "--set", "train.eval_steps=3", "--set", "train.save_steps=6",
        "--set", "output.report_to=[tensorboard]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return run, result


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]


def test_every_row_and_the_summary_carry_the_measured_peak(trained):
    run, result = trained
    logged = metrics(run)
    peaks = [row["peak_rss_since_start_bytes"] for row in logged]
    assert len(peaks) == 9, (
        "6 training rows and 3 eval rows (before the first step, at 3 and 6), each with its figure"
    )
    assert peaks == sorted(peaks), "a high-water mark since the process started never falls"
    summary = json.loads((run / rundir.SUMMARY).read_text())
    floor = summary["stages"]["load"][rundir.RSS_BEFORE_LOAD]
    figures = summary["stages"]["train"][rundir.MEASURED_MEMORY]
    estimate = json.loads((run / rundir.MEMORY_ESTIMATE).read_text())
    assert figures["device"] == "cpu" and figures["peak_bytes"] == max(peaks)
    assert figures["baseline_bytes"] == floor and 200 * 2**20 < floor < figures["peak_bytes"], (
        "the floor holds the training libraries (~0.5 GB) and is below the peak"
    )
    assert figures["estimated_bytes"] == estimate["peak_bytes"] - estimate["terms"]["overhead"]
    assert figures["ratio"] == pytest.approx((max(peaks) - floor) / figures["estimated_bytes"], abs=1e-3)
    # A tiny model's own bytes (~14 MiB) are dwarfed by Python objects, data and allocator slack: the
    # ratio is large here, but it is a positive, finite measure of the right quantity.
    assert 0 < figures["ratio"] < 1000 and math.isfinite(figures["ratio"])
    line = next(line for line in result.stdout.splitlines() if line.startswith("memory:"))
    assert "peak RSS" in line and "before loading; estimated" in line
    assert f"measured/estimated {figures['ratio']:.2f}" in line


def test_the_curves_picture_is_written_and_the_terminal_summarises(trained):
    run, result = trained
    assert png_size(run / rundir.CURVES) == (1100, 700)
    out = result.stdout
    assert "  loss " in out and "6 steps logged" in out
    assert "  eval loss " in out and "(3 evaluations" in out
    # the keys the metrics writer gives the Trainer's eval metrics are the ones the curves read
    evals = [row["eval_token_accuracy"] for row in read_rows(run) if "eval_loss" in row]
    assert [row["step"] for row in read_rows(run) if "eval_loss" in row] == [0, 3, 6], "eval at step 0 too"
    assert len(evals) == 3 and f"  eval accuracy  {evals[0]:.3f} -> {evals[-1]:.3f}" in out
    assert f"curves:     {run / rundir.CURVES}" in out
    before = (run / rundir.CURVES).read_bytes()
    report = vlmtune("report", str(run))
    assert report.returncode == 0 and "drawn when training ended" in report.stdout
    assert (run / rundir.CURVES).read_bytes() == before, "a finished run is never modified"


def test_tensorboard_event_files_hold_the_logged_loss(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = trained
    events = EventAccumulator(str(run / rundir.TENSORBOARD))
    events.Reload()
    logged = metrics(run)
    losses = [(row["step"], row["loss"]) for row in logged if "loss" in row]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (step, pytest.approx(loss, rel=1e-6)) for step, loss in losses
    ]
    eval_losses = [(row["step"], row["eval_loss"]) for row in logged if "eval_loss" in row]
    assert [(e.step, e.value) for e in events.Scalars("eval/loss")] == [
        (step, pytest.approx(loss, rel=1e-6)) for step, loss in eval_losses
    ]
    assert "train/peak_rss_since_start_bytes" in events.Tags()["scalars"], "trackers see the memory too"
    assert not (run / rundir.CHECKPOINTS / "runs").exists(), "not the Trainer's default folder"


def test_runs_lists_the_real_run(trained):
    run, _ = trained
    listed = json.loads(vlmtune("runs", str(run.parent), "--json").stdout)
    assert len(listed) == 1 and set(listed[0]) == RUN_KEYS
    summary = json.loads((run / rundir.SUMMARY).read_text())
    entry = listed[0]
    assert (entry["name"], entry["model"], entry["objective"], entry["status"], entry["steps"]) == (
        "tb", "tiny:qwen2_vl", "sft", "done", 6)  # fmt: skip
    assert entry["first_loss"] == summary["stages"]["train"]["first_loss"]
    assert entry["last_loss"] == summary["stages"]["train"]["last_loss"]
    assert entry["peak_memory_bytes"] == summary["stages"]["train"][rundir.MEASURED_MEMORY]["peak_bytes"]
    assert entry["seconds"] == summary["seconds"]


def test_stderr_carries_nothing_a_user_cannot_act_on(trained):
    _, result = trained
    assert "gemm_4bit_forward" not in result.stderr and "pip install kernels" not in result.stderr
    assert result.stderr.strip() == "", result.stderr
