"""bench/gpu.py --dry-run: every part of the GPU benchmark runs on CPU at tiny shapes and reports
real figures, so a GPU session spends its minutes measuring, not debugging (about 2-3 minutes)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

PARTS = {
    "env",
    "compare",
    "memory_qwen2_5_vl_7b",
    "memory_mllama_11b",
    "tiny_families",
    "torch_compile",
    "packing",
    "resume",
}
# The two compare arms compute the same loss on the same batch; on CPU they agreed to 3e-7
# (relative). 1e-3 leaves room for a different bf16 summation order, and none for different work.
SAME_LOSS_RELATIVE = 1e-3


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-dry-run")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--work", str(out / "work"),
           "--out", str(out / "gpu.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    path = out / "gpu.json"
    assert path.is_file(), f"no results written\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text()), proc


def finite(values) -> bool:
    return len(values) > 0 and all(isinstance(v, float) and math.isfinite(v) for v in values)


def test_every_part_ran_and_the_table_printed(dry_run):
    results, proc = dry_run
    failed = {
        name: (p.get("error"), p.get("log_tail"))
        for name, p in results["parts"].items()
        if p["status"] != "ok"
    }
    assert not failed, failed
    assert set(results["parts"]) == PARTS
    assert proc.returncode == 0
    assert results["mode"] == "dry-run" and results["device"] == "cpu"
    assert results["peak_kind"].startswith("rss_hwm")  # a CPU peak is labelled as what it is
    for line in ("vlmtune tokens/s over plain", "estimate / measured, Qwen2.5-VL-7B", "written to"):
        assert line in proc.stdout


def test_compare_arms_do_the_same_work(dry_run):
    cmp = dry_run[0]["parts"]["compare"]
    a, b = cmp["A_vlmtune"], cmp["B_plain"]
    for arm in (a, b):
        assert arm["steps"] == [3]
        assert all(finite(losses) and len(losses) == 3 for losses in arm["losses"])
        assert arm["tokens_per_s"] > 0 and arm["median_step_s"] > 0
        assert arm["peak_rss_mb"] > 0
    assert cmp["peak_kind"].startswith("RSS")
    for x, y in zip(a["first_loss"], b["first_loss"], strict=True):
        assert abs(x - y) <= SAME_LOSS_RELATIVE * abs(y), (x, y)
    assert cmp["same_tokens"] and cmp["same_trainable_params"]
    assert a["trainable_params"] > 0


@pytest.mark.parametrize("part", ["memory_qwen2_5_vl_7b", "memory_mllama_11b"])
def test_memory_parts_measure_and_estimate_the_same_workload(dry_run, part):
    figures = dry_run[0]["parts"][part]
    measured, estimate = figures["measured"], figures["estimate"]
    assert measured["steps"] == 2 and finite(measured["losses"])
    assert measured["tokens_per_s"] > 0
    assert measured["training_peak"]["kind"] == "rss_hwm" and measured["training_peak"]["rss_hwm"] > 0
    # The estimate was asked for the run's own workload: batch, image size, tokens per sample.
    inputs = estimate["inputs"]
    assert inputs["batch_size"] == 2 and inputs["r"] == 16 and inputs["bits"] == 4
    assert inputs["image_size"] == [112, 112]
    assert inputs["total_tokens"] == figures["settings"]["tokens_per_sample"]["max"]
    assert inputs["lora_targets"] > 0
    compared = figures["estimate_vs_measured"]
    assert compared["predicted_bytes"] > 0 and compared["measured_bytes"] > 0
    assert compared["predicted_bytes"] == estimate["peak_bytes"] - estimate["terms"]["overhead"]
    assert compared["ratio"] == pytest.approx(compared["predicted_bytes"] / compared["measured_bytes"])


def test_the_tiny_families_part_trains_each_family_it_names_in_4bit(dry_run):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import DRY, GPU

    from vlmtune.model.families import family_names

    assert GPU.tiny_families is None, "on a GPU every family trains"
    assert set(DRY.tiny_families) <= set(family_names())
    families = dry_run[0]["parts"]["tiny_families"]["families"]
    assert set(families) == set(DRY.tiny_families)
    for name, result in families.items():
        assert result["status"] == "ok", (name, result.get("error"))
        assert result["steps"] == 2 and finite(result["losses"]), name
        assert result["trainable_params"] > 0, name


def test_torch_compile_reports_step_time_both_ways(dry_run):
    figures = dry_run[0]["parts"]["torch_compile"]
    off, on = figures["compile_off"], figures["compile_on"]
    for run in (off, on):
        assert run["steps"] == 3 and finite(run["losses"])
        assert run["steady_step_s"] > 0
    # Compiling happens in the first step: with the flag on it is much slower than without (dynamo
    # traces the model even when inductor's disk cache is warm). A flag that did nothing would not be.
    assert on["first_step_s"] > 3 * off["first_step_s"]
    assert figures["steady_step_ratio_on_over_off"] > 0


def test_goals_are_judged_from_the_figures(dry_run):
    results = dry_run[0]
    rows = {row["goal"]: row for row in results["goals"]}
    cmp = results["parts"]["compare"]
    assert rows["vlmtune tokens/s over plain"]["measured"] == cmp["ratios_A_over_B"]["tokens_per_s"]
    assert rows["vlmtune tokens/s over plain"]["pass"] == (cmp["ratios_A_over_B"]["tokens_per_s"] >= 1.5)
    assert rows["vlmtune peak over plain"]["pass"] == (cmp["peak_ratio"] <= 0.6)
    assert rows["same loss at step 1 (compare)"]["pass"] is True
    for label, part in (
        ("Qwen2.5-VL-7B", "memory_qwen2_5_vl_7b"),
        ("Llama-3.2-11B-Vision", "memory_mllama_11b"),
    ):
        ratio = results["parts"][part]["estimate_vs_measured"]["ratio"]
        assert rows[f"estimate / measured, {label}"]["pass"] == (abs(ratio - 1) <= 0.10)
    assert rows["resume: losses vs uninterrupted"]["pass"] is True
    # No CUDA, no reserved memory: the Unsloth goal cannot be judged on CPU, and says so.
    assert rows["7B peak reserved (GiB) vs Unsloth"]["pass"] is None
    assert all(row["note"].startswith("dry run") for row in results["goals"])


def test_packing_part_trains_both_arms_on_each_shape(dry_run):
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import DRY, GPU

    assert set(GPU.packing_models) == {"Qwen/Qwen2-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"}
    part = dry_run[0]["parts"]["packing"]
    assert set(part["models"]) == set(DRY.packing_models) == {"Qwen/Qwen2.5-VL-7B-Instruct"}
    for figures in part["models"].values():
        for arm in ("unpacked", "packed"):
            assert figures[arm]["steps"] == 2 and finite(figures[arm]["losses"])
            assert figures[arm]["tokens_per_s"] > 0 and figures[arm]["mfu"] is None  # no MFU on CPU
        assert figures["packed"]["tokens_per_step"] > figures["unpacked"]["tokens_per_step"] / 2
        # no flash_attn on CPU: the packed arm's language model attends sample by sample, the unpacked arm's is sdpa
        assert figures["packed"]["language_attention"] == "vlmtune_per_sample_sdpa"
        assert figures["unpacked"]["language_attention"] == part["attn_implementation"] == "sdpa"
        assert figures["params_6n"] > 0 and figures["packed_over_unpacked"] > 0


def test_the_resume_part_checks_the_gpu_tolerance(dry_run):
    """On CPU the resume is exact: the tolerance holds with deltas of 0."""
    figures = dry_run[0]["parts"]["resume"]
    assert figures["saved_on_signal_at_step"] == 3 and figures["resume_first_step"] == 4
    assert figures["resume_first_step_delta"] == 0.0 and figures["resume_max_rel_delta"] == 0.0
    assert figures["resume_within_tolerance"] is True


def test_the_resume_tolerance_itself():
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu import resume_tolerance

    whole = {1: 7.0, 2: 6.0, 3: 5.0, 4: 4.0}
    assert resume_tolerance(whole, {**whole, 3: 5.0 + 5e-7, 4: 4.0 + 5e-3}, 2)["resume_within_tolerance"]
    assert not resume_tolerance(whole, {**whole, 3: 5.0 + 1e-5}, 2)["resume_within_tolerance"], "first step"
    assert not resume_tolerance(whole, {**whole, 4: 4.0 + 0.05}, 2)["resume_within_tolerance"], (
        "bf16 envelope"
    )
    assert not resume_tolerance(whole, {1: 7.0, 2: 6.0, 3: 5.0}, 2)["resume_within_tolerance"], (
        "a step missing"
    )
