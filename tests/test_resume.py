"""Interrupt a real `vlmtune train` (Ctrl-C, SIGTERM, kill -9; at a step, in mid-save, in the final
save, in the eval) and resume it: the run must end exactly as the uninterrupted one.

Exactness: the resumed run's metrics rows (loss, grad_norm, learning_rate, epoch, token accuracy,
padding) and its final adapter file must equal the uninterrupted run's BIT FOR BIT, with a tolerance
of zero, in bfloat16 (the 4-bit QLoRA default: TRL trains the LoRA weights in bf16) and in float32.
On CPU that is achievable: every kernel is deterministic for a given thread count, so once the
weights (in their dtype), optimizer, scheduler, RNG states and data order are restored, the
arithmetic repeats exactly. A tolerance would hide the defects this guards against: before the
fix the steps after the checkpoint differed in the 3rd-4th digit (float32 LoRA weights after the
resume, a different length-grouped data order). On a GPU, non-deterministic kernels (atomics in
cuBLAS/cuDNN reductions) make even two uninterrupted runs differ in the last bits; this test is
the CPU contract.

The recipe: 12 samples, batch 2 x grad_accum 2 = 3 steps per epoch, 7 steps, a checkpoint every 2
steps (2, 4, 6, and 7 at the end), LoRA dropout 0.1 (so the RNG state matters), linear schedule
with warmup (so the scheduler state matters).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import spawn

from conftest import ROOT, write_recipe
from test_cli import vlmtune

pytestmark = pytest.mark.slow

DEMO = ROOT / "data" / "demo"
STEPS = 7


def recipe(folder: Path, *, model: dict | None = None, quantization: dict | None = None, **train) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl", **(model or {})},
        quantization=quantization or {"bits": 4},
        lora={"dropout": 0.1},
        data={"train": str(DEMO / "train.jsonl"), "eval": str(DEMO / "eval.jsonl"), "max_image_pixels": 12544,
              "max_samples": 12},
        train={"max_steps": STEPS, "batch_size": 2, "grad_accum": 2, "lr": 5e-3, "warmup_steps": 2,
               "max_length": 256, "gradient_checkpointing": False, "save_steps": 2, "save_total_limit": 3,
               **train},
    )  # fmt: skip


def with_fault(fault: str, *args: str) -> subprocess.CompletedProcess:
    """The CLI with one fault injected at an exact moment (tests/faults.py)."""
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    return spawn.run(
        [sys.executable, str(ROOT / "tests" / "faults.py"), fault, "--", *args],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "3-train/metrics.jsonl").read_text().splitlines()]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def complete_checkpoints(run: Path) -> list[str]:
    folder = run / "3-train/checkpoints"
    return sorted(
        (p.name for p in folder.glob("checkpoint-*") if (p / "vlmtune_complete.json").is_file()),
        key=lambda name: int(name.split("-")[1]),
    )


def assert_same_run(resumed: Path, baseline: Path) -> None:
    """Every logged figure of every step, and the final adapter's bytes, equal the uninterrupted run's."""
    steps = [r["step"] for r in rows(resumed)]
    assert len(steps) == len(set(steps)), f"each step logged once: {steps}"
    assert steps == [r["step"] for r in rows(baseline)]
    for mine, theirs in zip(rows(resumed), rows(baseline), strict=True):
        assert training_figures(mine) == training_figures(theirs), f"step {mine['step']} differs"
    adapter = "3-train/adapter/adapter_model.safetensors"
    assert (resumed / adapter).read_bytes() == (baseline / adapter).read_bytes(), "final adapter differs"


def training_figures(row: dict) -> dict:
    """A metrics row without the measured memory (a property of the process, not of the training)."""
    from vlmtune.observe import memory

    figures = {key: value for key, value in row.items() if key not in memory.KEYS}
    assert {"loss", "grad_norm", "learning_rate", "epoch"} <= set(figures)
    return figures


# The recipe variants compared: QLoRA (bf16 LoRA weights), float32 without quantization, and a row
# logged every 3 steps (the first row after a resume must average the same steps).
CONFIGS = {
    "bfloat16": {},
    "float32": {"model": {"dtype": "float32"}, "quantization": {"bits": None}},
    "log every 3": {"logging_steps": 3},
}


@pytest.fixture(scope="module")
def baselines(tmp_path_factory):
    """baselines(config) -> the uninterrupted run of that recipe variant, trained once for the module."""
    made: dict[str, Path] = {}

    def baseline(config: str) -> Path:
        if config not in made:
            folder = tmp_path_factory.mktemp("baseline")
            result = vlmtune(
                "train", str(recipe(folder, **CONFIGS[config])), "--run-dir", str(folder / "run")
            )
            assert result.returncode == 0, result.stderr[-3000:]
            made[config] = folder / "run"
        return made[config]

    return baseline


def test_qlora_trains_its_lora_weights_in_bfloat16(baselines):
    import torch
    from safetensors.torch import load_file

    weights = load_file(baselines("bfloat16") / "3-train/adapter/adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}, "what a resume must keep"
    assert [r["step"] for r in rows(baselines("bfloat16"))] == list(range(1, STEPS + 1))


# fault, recipe variant, the checkpoint the resume starts from (None: step 0), a checkpoint it skips
SCENARIOS = {
    "ctrl-c at a step, mid-epoch": ("SIGINT@step:3", "bfloat16", "checkpoint-2", None),
    "kill -9 at a step, second epoch": ("SIGKILL@step:5", "bfloat16", "checkpoint-4", None),
    # SIGTERM/SIGHUP finish the step in progress and save it: asked at step 6, step 6 is saved
    "SIGTERM at an epoch boundary": ("SIGTERM@step:5", "bfloat16", "checkpoint-6", None),
    "SIGHUP between periodic saves": ("SIGHUP@step:2", "bfloat16", "checkpoint-3", None),
    "ctrl-c in mid-save": ("SIGINT@save:4:scheduler.pt", "bfloat16", "checkpoint-2", "checkpoint-4"),
    "kill -9 in the first save": ("SIGKILL@save:2:scheduler.pt", "bfloat16", None, "checkpoint-2"),
    "kill -9 at a step, float32": ("SIGKILL@step:5", "float32", "checkpoint-4", None),
    "kill -9 between two log rows": ("SIGKILL@step:5", "log every 3", "checkpoint-4", None),
}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_an_interrupted_run_resumes_to_exactly_the_uninterrupted_run(scenario, baselines, tmp_path: Path):
    fault, config, resume_from, skipped = SCENARIOS[scenario]
    name = fault.partition("@")[0]
    run = tmp_path / "run"

    stopped = with_fault(fault, "train", str(recipe(tmp_path, **CONFIGS[config])), "--run-dir", str(run))
    assert stopped.returncode in (128 + getattr(signal, name), -getattr(signal, name)), stopped.stderr[-3000:]
    assert "adapter" not in os.listdir(run / "3-train")
    if skipped:
        assert not (run / "3-train/checkpoints" / skipped / "vlmtune_complete.json").exists()
    if name in ("SIGTERM", "SIGHUP"):  # saved at the end of the step in progress
        assert summary(run)["saved_on_signal"]["step"] == int(resume_from.split("-")[1])
        assert f"saved {resume_from} at the step boundary after the signal" in stopped.stderr
    if name == "SIGKILL":  # no chance to write anything: the status stays as it was
        assert summary(run)["status"] == "running"
    else:
        state = summary(run)
        assert state["status"] == "interrupted" and state["stopped_by"] == name
        assert state["stages"]["train"]["status"] == "interrupted"
        assert state["resume_from_step"] == (int(resume_from.split("-")[1]) if resume_from else 0)
        assert f"interrupted ({name}) after step {state['last_step']}" in stopped.stderr
        assert f"vlmtune train --resume {run}" in stopped.stderr

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    if resume_from:
        assert f"resuming {run} from {resume_from}" in resumed.stdout
    else:
        assert "no complete checkpoint, so training starts again from step 0" in resumed.stdout
    if skipped:
        assert f"skipped {skipped}: incomplete: its save was interrupted" in resumed.stdout
    assert summary(run)["status"] == "done"
    assert_same_run(run, baselines(config))
    assert complete_checkpoints(run) == ["checkpoint-4", "checkpoint-6", "checkpoint-7"], (
        "3 kept, none partial"
    )


def test_sigterm_in_mid_step_saves_that_step_and_the_resume_continues_from_it(baselines, tmp_path: Path):
    """A scheduler's SIGTERM arrives while a slow step runs (each of its micro-batches sleeps 3 s): the
    step finishes, a complete checkpoint of it is saved (step 3: no periodic save is due there), the run
    stops as interrupted, and the resume starts from step 3 with the uninterrupted run's losses."""
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    process = spawn.Popen(
        [sys.executable, str(ROOT / "tests/faults.py"), "SLOW@step:2", "--", "train", str(recipe(tmp_path)),
         "--run-dir", str(run)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    before = []
    try:
        for line in process.stderr:  # the first micro-batch of step 3 has begun sleeping
            before.append(line)
            if "slow step" in line:
                break
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=300)
    finally:
        process.kill()
    err = "".join(before) + err
    assert process.returncode == 143, err[-3000:]
    state = summary(run)
    assert state["status"] == "interrupted" and state["stopped_by"] == "SIGTERM"
    assert state["saved_on_signal"]["step"] == 3 and state["resume_from_step"] == 3
    assert state["saved_on_signal"]["seconds_after_signal"] > 0
    assert complete_checkpoints(run)[-1] == "checkpoint-3"
    assert [r["step"] for r in rows(run) if "loss" in r] == [1, 2, 3], "stopped right after the saved step"
    assert "saved checkpoint-3 at the step boundary after the signal" in err

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from checkpoint-3 (step 3)" in resumed.stdout
    assert_same_run(run, baselines("bfloat16"))


def test_a_run_whose_weights_blow_up_slowly_is_stopped_and_resumes_from_the_last_good_checkpoint(
    baselines, tmp_path: Path
):
    """The subtler divergence: from step 2 on the weights are multiplied by 5 before each step (no single
    step grows them 10 times, no number becomes NaN). The run stops as failed once they have grown by
    three orders of magnitude; the checkpoints saved while they grew are set aside, the one before is
    the last good one, and a resume from it (without the fault) ends as the uninterrupted run."""
    run = tmp_path / "run"
    stopped = with_fault("GROW@step:1", "train", str(recipe(tmp_path, save_steps=1)), "--run-dir", str(run))
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    state = summary(run)
    train = state["stages"]["train"]
    assert state["status"] == "failed" and train["collapse"] == "weights_blew_up"
    assert f"training collapsed at step {train['diverged_at_step']}" in stopped.stderr
    assert "times since training started" in train["evidence"]
    assert train["last_good_checkpoint"] == "checkpoint-1" and "checkpoint-1, is kept" in stopped.stderr
    assert complete_checkpoints(run)[0] == "checkpoint-1", "kept: rotation waits while a blow-up may start"
    assert not (run / "3-train/adapter").exists()

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped checkpoint-2: set aside: saved after the training collapsed" in resumed.stdout
    assert f"resuming {run} from checkpoint-1 (step 1)" in resumed.stdout
    assert_same_run(run, baselines("bfloat16"))


def test_the_demo_at_lr_1e9_is_stopped_as_collapsed_at_its_first_step(tmp_path: Path):
    """The issue's case: on the demo recipe, lr 1e9 never gives a NaN (the gradient norm is 0 from step 2,
    the loss flat, the adapter's weights ~1e9) and the run used to say done."""
    run = tmp_path / "run"
    result = vlmtune(
        "train", str(ROOT / "recipes/demo.yaml"), "--set", "train.lr=1e9", "--set", "train.max_steps=6",
        "--set", "train.save_steps=2", "--run-dir", str(run),
    )  # fmt: skip
    assert result.returncode == 3, result.stderr[-3000:]
    assert "train.lr 1e+09 is far above any sensible learning rate" in result.stdout  # warned before loading
    train = summary(run)["stages"]["train"]
    assert summary(run)["status"] == "failed" and train["diverged_at_step"] == 1
    assert train["collapse"] == "weights_blew_up" and train["last_good_checkpoint"] is None
    assert (
        "training collapsed at step 1: one update multiplied the trainable weights' norm by" in result.stderr
    )
    assert "Likely cause: train.lr 1e+09 is far above the usual rates" in result.stderr
    assert complete_checkpoints(run) == [] and not (run / "3-train/adapter").exists()
    assert "done" not in result.stdout
    refused = vlmtune("export", str(run), "--out", str(tmp_path / "out"))
    assert refused.returncode == 2 and "did not finish training" in refused.stderr


def test_export_and_predict_refuse_collapsed_weights_unless_forced(baselines, tmp_path: Path):
    """A finished run whose adapter holds weights no trained model holds (a run of before the collapse
    guard): refused, with --force as the way through."""
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    adapter = run / "3-train/adapter/adapter_model.safetensors"
    weights = load_file(adapter)
    name = next(k for k in weights if "lora_A" in k)
    weights[name] = torch.full_like(weights[name], 2.6e9)
    save_file(weights, adapter, metadata={"format": "pt"})
    for args in (
        ("export", str(run), "--out", str(tmp_path / "out")),
        ("predict", str(run), "--prompt", "What color is the shape?"),
    ):
        result = vlmtune(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"hold values over 100000 in 1 tensor(s), e.g. {name}: the training collapsed" in result.stderr
        assert "--force uses these weights anyway" in result.stderr
    assert not (tmp_path / "out").exists()
    forced = vlmtune("export", str(run), "--out", str(tmp_path / "out"), "--force")
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert (tmp_path / "out/adapter_model.safetensors").is_file()


def test_a_kill_during_export_leaves_an_obviously_partial_folder_that_the_next_export_removes(
    baselines, tmp_path: Path
):
    out = tmp_path / "exports/demo"
    killed = with_fault("SIGKILL@export", "export", str(baselines("bfloat16")), "--out", str(out))
    assert killed.returncode == -signal.SIGKILL
    partial = [p.name for p in out.parent.iterdir()]
    assert len(partial) == 1 and partial[0].startswith("demo.partial-"), partial  # visible, not hidden
    assert not out.exists()
    refused = vlmtune("export", str(baselines("bfloat16")), "--out", str(out.parent / partial[0]))
    assert refused.returncode == 2, refused.stderr[-2000:]
    done = vlmtune("export", str(baselines("bfloat16")), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p.name for p in out.parent.iterdir()] == ["demo"], "the dead process's partial folder is gone"


def test_a_resume_refuses_data_that_changed_since_the_run_started(tmp_path: Path):
    shutil.copytree(DEMO, tmp_path / "data")
    train = tmp_path / "data/train.jsonl"
    path = recipe(tmp_path, max_steps=3, save_steps=1)
    path.write_text(path.read_text().replace(str(DEMO / "train.jsonl"), str(train)))
    run = tmp_path / "run"
    stopped = with_fault("SIGKILL@step:1", "train", str(path), "--run-dir", str(run))
    assert stopped.returncode == -signal.SIGKILL
    recorded = summary(run)["data_fingerprints"]["train"]
    assert recorded["source"] == str(train) and recorded["bytes"] == train.stat().st_size

    train.write_text("".join(train.read_text().splitlines(keepends=True)[:20]))  # 48 samples become 20
    before = tree(run)
    result = vlmtune("train", "--resume", str(run))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"the data of run {run} changed since it started" in result.stderr
    assert f"data.train ({train}): {recorded['bytes']:,} bytes when the run started" in result.stderr
    assert "hint: put the data back as it was" in result.stderr
    after = tree(run)
    assert after.pop(".lock") and before.pop(".lock") and after == before, "a refused resume changes nothing"


class _Opens:
    """Unpickling this creates a file: proof that something unpickled it."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_an_adapter_stored_as_a_pickle_is_refused_before_anything_unpickles_it(baselines, tmp_path: Path):
    import pickle

    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    adapter = run / "3-train/adapter"
    (adapter / "adapter_model.safetensors").unlink()
    proof = tmp_path / "unpickled"
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps({"weights": _Opens(proof)}))
    sft = recipe(tmp_path / "next", model={"adapter": str(run)}, max_steps=1)
    for args in (
        ("export", str(run), "--out", str(tmp_path / "out")),
        ("predict", str(run), "--prompt", "What color is the shape?", "--force"),
        ("train", str(sft), "--run-dir", str(tmp_path / "next/run")),
    ):
        result = vlmtune(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert (
            "holds pickled weights (adapter_model.bin); vlmtune reads weights from safetensors files only"
            in (result.stderr)
        )
        assert not proof.exists(), f"{args[0]} unpickled the file"


def test_a_kill_during_the_final_save_resumes_without_training_a_step_more(baselines, tmp_path: Path):
    run = tmp_path / "run"
    stopped = with_fault("SIGKILL@final", "train", str(recipe(tmp_path)), "--run-dir", str(run))
    assert stopped.returncode == -signal.SIGKILL
    assert complete_checkpoints(run)[-1] == f"checkpoint-{STEPS}" and summary(run)["status"] == "running"

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from checkpoint-{STEPS} (step {STEPS})" in resumed.stdout
    assert summary(run)["stages"]["train"]["steps"] == STEPS
    assert_same_run(run, baselines("bfloat16"))


def tree(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_resuming_a_finished_run_changes_nothing_and_says_so(baselines):
    run = baselines("bfloat16")
    before = tree(run)
    result = vlmtune("train", "--resume", str(run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"run {run} is finished ({STEPS} steps): nothing to resume, nothing changed" in result.stdout
    result = vlmtune("train", "--resume", str(run), "--set", "train.max_steps=20")
    assert result.returncode == 2
    assert (
        "is finished; a finished run is never changed, so --set train.max_steps=20 cannot apply"
        in result.stderr
    )
    assert tree(run) == before, "not one file of a finished run changed (no lock file either)"


def test_a_kill_during_the_eval_resumes_only_the_eval(tmp_path: Path):
    run = tmp_path / "run"
    # One eval sample: an answer of a barely trained model runs to the 64-token limit, slowly on CPU.
    shutil.copytree(DEMO / "images", tmp_path / "images")
    (tmp_path / "eval.jsonl").write_text((DEMO / "eval.jsonl").read_text().splitlines()[0] + "\n")
    path = recipe(tmp_path, max_steps=2, eval_generate=True)
    path.write_text(path.read_text().replace(str(DEMO / "eval.jsonl"), "eval.jsonl"))
    stopped = with_fault("SIGKILL@eval", "train", str(path), "--run-dir", str(run))
    assert stopped.returncode == -signal.SIGKILL
    state = summary(run)
    assert state["status"] == "running" and state["stages"]["train"]["status"] == "done"
    trained = tree(run)

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "training finished; running the eval that was left" in resumed.stdout
    state = summary(run)
    assert state["status"] == "done" and state["stages"]["eval"]["status"] == "done"
    assert state["stages"]["train"]["steps"] == 2
    assert (run / "4-eval/eval_report.json").is_file()
    after = tree(run)
    for name in ("3-train/metrics.jsonl", "3-train/adapter/adapter_model.safetensors"):
        assert after[name] == trained[name], f"{name} changed: the resume trained again"


def test_a_second_process_is_refused_and_a_dead_ones_lock_does_not_hold(tmp_path: Path):
    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    first = spawn.Popen(
        [sys.executable, str(ROOT / "tests/faults.py"), "PAUSE@step:2", "--", "train", str(recipe(tmp_path)),
         "--run-dir", str(run)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (run / "3-train/metrics.jsonl").is_file() or len(rows(run)) < 2:
            assert first.poll() is None and time.time() < deadline, "the first run should pause at step 2"
            time.sleep(0.2)
        second = vlmtune("train", "--resume", str(run))
        assert second.returncode == 2
        assert f"run {run} is in use by process {first.pid}" in second.stderr
        assert "two processes must never train one run folder" in second.stderr
        assert summary(run)["status"] == "running", "the refused process changed nothing"
    finally:
        first.kill()
        first.wait()
    # The holder died without a word (kill -9): its lock went with it. This resume gets past the lock
    # and stops at the next check (a change it refuses), so no training is needed to prove it.
    third = vlmtune("train", "--resume", str(run), "--set", "lora.r=4")
    assert third.returncode == 2 and "in use" not in third.stderr
    assert "--resume cannot change lora.r" in third.stderr


def test_non_finite_loss_stops_the_run_keeps_the_last_good_checkpoint(tmp_path: Path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    # the collapse guard would stop this run at step 1, before any NaN: the NaN guard is tested alone
    stopping = recipe(tmp_path, lr=1e9, save_steps=1, divergence_checks=False)
    result = vlmtune("train", str(stopping), "--run-dir", str(run))
    assert result.returncode == 3, result.stderr[-3000:]
    state = summary(run)
    train = state["stages"]["train"]
    step = train["diverged_at_step"]
    assert state["status"] == "failed" and train["status"] == "failed" and step >= 2
    assert f"training diverged at step {step}: the {train['non_finite']} is nan" in result.stderr
    assert "Likely cause: train.lr 1e+09 is far above the usual rates" in result.stderr
    assert train["last_good_checkpoint"] == f"checkpoint-{step - 1}"
    assert complete_checkpoints(run)[-1] == f"checkpoint-{step - 1}", "nothing saved at or after the bad step"
    weights = load_file(run / f"3-train/checkpoints/checkpoint-{step - 1}/adapter_model.safetensors")
    import torch

    assert all(bool(torch.isfinite(t).all()) for t in weights.values())
    assert not (run / "3-train/adapter").exists(), "no final adapter for a diverged run"
    assert "done" not in result.stdout


def test_export_predict_and_eval_refuse_weights_that_are_not_finite(baselines, tmp_path: Path):
    import torch
    from safetensors.torch import load_file, save_file

    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    adapter = run / "3-train/adapter/adapter_model.safetensors"
    weights = load_file(adapter)
    name = next(k for k in weights if "lora_B" in k)
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, adapter, metadata={"format": "pt"})
    for args in (
        ("export", str(run), "--out", str(tmp_path / "out")),
        ("predict", str(run), "--prompt", "What color is the shape?"),
        ("eval", str(run)),
    ):
        result = vlmtune(*args)
        assert result.returncode == 2, result.stderr[-2000:]
        assert f"hold NaN or inf in 1 tensor(s), e.g. {name}" in result.stderr
        assert "the training diverged" in result.stderr
    assert not (tmp_path / "out").exists()


def as_interrupted_at(run: Path, step: int) -> None:
    """Make a finished run's copy look like one killed after ``step`` (checkpoints after it gone)."""
    shutil.rmtree(run / "3-train/adapter")
    for checkpoint in (run / "3-train/checkpoints").glob("checkpoint-*"):
        if int(checkpoint.name.split("-")[1]) > step:
            shutil.rmtree(checkpoint)
    state = summary(run)
    state["status"] = state["stages"]["train"]["status"] = "running"
    (run / "summary.json").write_text(json.dumps(state))


def test_a_damaged_checkpoint_is_skipped_for_the_one_before_it(baselines, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    as_interrupted_at(run, 6)
    saved = (run / "3-train/checkpoints/checkpoint-6/scheduler.pt").stat().st_size
    (run / "3-train/checkpoints/checkpoint-6/scheduler.pt").write_bytes(b"")

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipped checkpoint-6: scheduler.pt is 0 bytes; it had {saved:,} when saved" in resumed.stdout
    assert f"resuming {run} from checkpoint-4 (step 4)" in resumed.stdout
    assert_same_run(run, baselines("bfloat16"))


def test_no_usable_checkpoint_is_a_message_naming_each_damaged_file(baselines, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    as_interrupted_at(run, 6)
    (run / "3-train/checkpoints/checkpoint-6/scheduler.pt").write_bytes(b"")
    garble_largest_tensor(run / "3-train/checkpoints/checkpoint-4/optimizer.pt")
    before = tree(run)

    result = vlmtune("train", "--resume", str(run))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"run {run} has no usable checkpoint" in result.stderr
    assert "checkpoint-6: scheduler.pt is 0 bytes" in result.stderr
    assert "checkpoint-4: optimizer.pt is damaged" in result.stderr
    assert "Traceback" not in result.stderr
    unlocked = {k: v for k, v in tree(run).items() if k != ".lock"}  # the lock notes who last held it
    assert unlocked == {k: v for k, v in before.items() if k != ".lock"}, "a refused resume changes nothing"


def garble_largest_tensor(path: Path) -> None:
    """Flip bytes inside the largest tensor of a torch.save archive: same size, damaged content."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        member = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", data[member.header_offset + 26 : member.header_offset + 30]
    )
    middle = member.header_offset + 30 + name_length + extra_length + member.file_size // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))


def test_resume_refuses_changes_it_cannot_honour_naming_the_keys(baselines, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    as_interrupted_at(run, 4)
    result = vlmtune("train", "--resume", str(run), "--set", "train.lr=1e-3", "--set", "lora.r=8")
    assert result.returncode == 2
    assert "--resume cannot change lora.r, train.lr: a resumed run continues the recipe" in result.stderr
    assert "lora.r: 16 -> 8" in result.stderr and "train.lr: 0.005 -> 0.001" in result.stderr
    assert "a resume may change only train.max_steps, train.epochs" in result.stderr
    result = vlmtune("train", "--resume", str(run), "--set", "train.max_steps=2")
    assert result.returncode == 2
    assert (
        "train.max_steps 2 is below the step of the checkpoint a resume starts from (checkpoint-4)"
        in result.stderr
    )
    assert "hint: give train.max_steps of at least 4" in result.stderr

    resolved = run / "resolved.yaml"
    resolved.write_text(resolved.read_text().replace("r: 16", "r: 32").replace("tiny:qwen2_vl", "tiny:llava"))
    result = vlmtune("train", "--resume", str(run))
    assert result.returncode == 2
    assert f"{resolved} was edited since the run started, and a resume cannot change lora.r, model.name" in (
        result.stderr
    )
    assert "model.name: 'tiny:qwen2_vl' -> 'tiny:llava'" in result.stderr
    assert "size mismatch" not in result.stderr and "Traceback" not in result.stderr
    assert summary(run)["status"] == "running", "a refused resume changes nothing"


def test_a_run_with_only_its_eval_left_refuses_changes_to_its_training(baselines, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(baselines("bfloat16"), run)
    state = summary(run)
    state["status"] = "interrupted"  # stopped after the train stage, during the eval
    (run / "summary.json").write_text(json.dumps(state))
    before = tree(run)
    result = vlmtune("train", "--resume", str(run), "--set", "train.max_steps=20")
    assert result.returncode == 2
    assert f"run {run} finished training (only its eval is left), so train.max_steps can no longer" in (
        result.stderr
    )
    assert "hint: resume without --set to run the eval, or start a new run" in result.stderr
    after = tree(run)
    assert after.pop(".lock") and before.pop(".lock"), "the lock names its latest holder (the refused resume)"
    assert after == before, "a refused resume changes nothing else"


def test_a_full_disk_fails_the_run_with_a_message_and_the_resume_skips_the_partial_checkpoint(
    baselines, tmp_path: Path
):
    run = tmp_path / "run"
    result = with_fault("ENOSPC@save:4:optimizer.pt", "train", str(recipe(tmp_path)), "--run-dir", str(run))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"no space left on the device of {run} while writing" in result.stderr
    assert "checkpoint-4/optimizer.pt" in result.stderr
    assert "Traceback" not in result.stderr
    state = summary(run)
    assert state["status"] == "failed" and state["stages"]["train"]["status"] == "failed"
    assert state["stages"]["train"]["error"].startswith("no space left on the device")

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipped checkpoint-4: incomplete" in resumed.stdout and "from checkpoint-2" in resumed.stdout
    assert_same_run(run, baselines("bfloat16"))


def test_ctrl_c_during_load_marks_the_run_interrupted(tmp_path: Path):
    run = tmp_path / "run"
    result = with_fault("SIGINT@load", "train", str(recipe(tmp_path)), "--run-dir", str(run))
    assert result.returncode == 130, result.stderr[-3000:]
    state = summary(run)
    assert state["status"] == "interrupted" and state["stages"]["load"]["status"] == "interrupted"
    assert state["stages"]["train"]["status"] == "pending" and state["resume_from_step"] == 0
    assert f"interrupted (SIGINT); run folder: {run}" in result.stderr
    assert f"vlmtune train --resume {run}" in result.stderr


@pytest.fixture
def small_disk(tmp_path: Path):
    """A real 900 KiB filesystem (a tmpfs; mounting needs root, so elsewhere the test is skipped):
    the libraries report a full disk each their own way (safetensors "os error 28", torch.save
    "unexpected pos"), which an injected ENOSPC does not show."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and (
            spawn.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)], capture_output=True)
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield disk
    finally:
        spawn.run(["umount", "-l", str(disk)], check=False)


def test_a_real_full_disk_is_a_message_and_the_run_resumes_once_there_is_room(
    baselines, tmp_path: Path, small_disk: Path
):
    run = small_disk / "run"
    result = vlmtune("train", str(recipe(tmp_path)), "--run-dir", str(run))
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"no space left on the device of {run}" in result.stderr and "Traceback" not in result.stderr
    assert summary(run)["status"] == "failed", "summary.json says so even on the full disk"

    spawn.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "incomplete: its save was interrupted" in resumed.stdout
    assert_same_run(run, baselines("bfloat16"))
