"""bench/gpu.py --dry-run --parts workloads kernels offload: issue 26's performance parts run on CPU at tiny
shapes (the kernels under the Triton interpreter), so a GPU session spends its minutes measuring (~2 min).
Also the MFU arithmetic and the profiler's classes, which need no run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))

import gpu_perf  # noqa: E402

from vlmtune.kernels import triton_available  # noqa: E402

# the kernels part needs triton (the dev extra, Linux only): without it the others still run
PERF_PARTS = {"workloads", "offload"} | ({"kernels"} if triton_available() else set())


def test_step_flops_counts_recompute_and_each_component():
    """6 FLOPs per weight per token with checkpointing (fwd, recompute, input grad), 4 without; lm_head on
    labelled tokens only; causal text attention 2 s^2 d per layer forward, full vision attention 4 n^2 d."""
    base = dict(language_params=1000, vision_params=100, head_params=10, text_tokens=50, vision_patches=40,
                labelled_tokens=5, text_sequence_lengths=[30, 20], image_patch_counts=[40], text_layers=2,
                text_width=8, vision_layers=3, vision_width=4)  # fmt: skip
    linear = 1000 * 50 + 100 * 40 + 10 * 5
    text_attention = 2 * 2 * 8 * (30**2 + 20**2)
    vision_attention = 3 * 4 * 4 * 40**2
    assert gpu_perf.step_flops(**base, checkpointing=True) == 6 * linear + 4 * (
        text_attention + vision_attention
    )
    assert gpu_perf.step_flops(**base, checkpointing=False) == 4 * linear + 3 * (
        text_attention + vision_attention
    )


def test_peak_flops_by_card():
    assert gpu_perf.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_perf.peak_flops("NVIDIA H200") == 989e12
    assert gpu_perf.peak_flops("x86_64") is None  # no MFU on CPU


@pytest.mark.parametrize(
    ("name", "inside_vision", "label"),
    [
        ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>", False, "4-bit dequantize"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", False, "matmuls"),
        ("aten::mm", True, "vision tower"),
        ("pytorch_flash::flash_fwd_kernel", False, "attention"),
        ("_rms_forward", False, "norms/rotary/activations"),
        ("aten::nll_loss_forward", False, "loss"),
        ("multi_tensor_apply_kernel<_foreach_adam>", False, "optimizer"),
        ("aten::copy_", False, "other"),
    ],
)
def test_profiler_classes(name, inside_vision, label):
    assert gpu_perf.classify(name, inside_vision) == label


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-perf-dry-run")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    cmd = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--parts", *sorted(PERF_PARTS),
           "--work", str(out / "work"), "--out", str(out / "gpu.json")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500, cwd=ROOT)
    path = out / "gpu.json"
    assert path.is_file(), f"no results written\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text()), proc


@pytest.mark.slow
def test_perf_parts_ran(dry_run):
    results, proc = dry_run
    failed = {
        n: (p.get("error"), p.get("log_tail")) for n, p in results["parts"].items() if p["status"] != "ok"
    }
    assert not failed, failed
    assert set(results["parts"]) == PERF_PARTS and proc.returncode == 0


@pytest.mark.slow
@pytest.mark.parametrize("workload", list(gpu_perf.WORKLOADS))
def test_workloads_measure_both_arms_with_mfu_and_a_breakdown(dry_run, workload):
    figures = dry_run[0]["parts"]["workloads"][workload]
    ours, plain = figures["vlmtune"], figures["plain"]
    for arm in (ours, plain):
        assert arm["steps"] == 2 and len(arm["losses"]) == 2 and all(math.isfinite(x) for x in arm["losses"])
        assert arm["tokens_per_s"] > 0
        assert arm["flops_per_step"] > 0 and arm["mfu"] is None  # no peak FLOP/s for a CPU
        assert arm["linear_params"]["language"] > 0 and arm["linear_params"]["vision"] > 0
    # the same model and the same samples: the same Linear layers and the same tokens a step
    assert ours["linear_params"] == plain["linear_params"]
    assert ours["tokens_per_step_mean"] == plain["tokens_per_step_mean"]
    assert plain["settings"]["assistant_only_loss"] is True
    assert figures["ratios_vlmtune_over_plain"]["tokens_per_s"] > 0
    table = ours["breakdown"]["ms"]
    for label in ("matmuls", "attention", "vision tower", "loss", "optimizer", "data loading", "idle"):
        assert label in table
    assert table["matmuls"] > 0 and table["vision tower"] > 0
    if gpu_perf.WORKLOADS[workload][2] == 4:
        assert table.get("4-bit dequantize", 0) > 0


@pytest.mark.slow
@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_kernel_microbenchmarks_agree_with_torch_and_leave_auto_alone_on_cpu(dry_run):
    figures = dry_run[0]["parts"]["kernels"]
    assert set(figures["kernels"]) == {"rmsnorm", "swiglu", "geglu", "rope", "nf4_lora"}
    for name, row in figures["kernels"].items():
        assert row["kernel_ms"] > 0 and row["torch_ms"] > 0, name
        assert row["max_abs_error"] < 1e-4 and row["agrees"], (
            name
        )  # fp32 under the interpreter: the same numbers
    assert figures["measured_faster"] == {}  # CPU timings never feed train.kernels: auto


@pytest.mark.slow
def test_offload_runs_both_ways(dry_run):
    figures = dry_run[0]["parts"]["offload"]
    for key in ("offload_off", "offload_on"):
        assert figures[key]["steps"] == 2 and all(math.isfinite(x) for x in figures[key]["losses"])
    # the same data and seed: offloading changes where tensors wait, not what is computed
    assert figures["offload_on"]["losses"] == pytest.approx(figures["offload_off"]["losses"], rel=1e-5)
    assert figures["step_time_ratio_on_over_off"] > 0
