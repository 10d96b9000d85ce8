"""A GRPO run stopped by SIGTERM and resumed ends exactly as the uninterrupted run, and a finished
GRPO run is never trained again.

Exactness, as for SFT (tests/test_resume.py): every metrics row (loss, reward and each reward's
mean, their spreads, kl, entropy, completion lengths, grad_norm, learning_rate, the held-out reward),
every logged completion with its reward and advantage, and the final adapter's bytes equal the
uninterrupted run's, with a tolerance of zero, on the 4-bit model (LoRA weights in bfloat16). On CPU
that holds although GRPO samples its completions: generate() draws from torch's global RNG, which the
Trainer restores from the checkpoint before the first step after it; the prompts come from TRL's
RepeatSampler, which vlmtune reseeds per epoch (a fresh sampler would replay the first epoch's
order in a later one); and GRPO generates at the first micro-batch of each optimizer step, so no
generation batch straddles a checkpoint. On a GPU, non-deterministic kernels make even two
uninterrupted runs differ in the last bits: this is the CPU contract.

The recipe: 4 prompts, 2 per optimizer step (4 completions each, batch 4 x grad_accum 2), so an
epoch is 2 steps; 5 steps, a checkpoint every 3 (3, then 5 at the end), the held-out reward before
training, at step 3 and at the end (on one held-out prompt). SIGTERM as step 3 begins: step 3 finishes and is
saved (vlmtune.runs.signals), and the resume starts from checkpoint-3, in the middle of the second epoch.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune
from test_resume import tree, with_fault

pytestmark = pytest.mark.slow

DEMO = ROOT / "data" / "demo"
STEPS = 5


def recipe(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    held_out = folder / "eval.jsonl"  # one prompt: GRPO's held-out reward samples its completions too
    held_out.write_text(
        (DEMO / "eval.jsonl").read_text().splitlines()[0].replace('"images/', f'"{DEMO}/images/')
    )
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(DEMO / "train.jsonl"), "eval": str(held_out), "max_samples": 4,
              "max_image_pixels": PIXEL_BUDGET},
        train={"objective": "grpo", "max_steps": STEPS, "batch_size": 4, "grad_accum": 2, "lr": 1e-3,
               "warmup_steps": 2, "max_length": 256, "eval_steps": 3, "save_steps": 3},
        grpo={"num_generations": 4, "max_completion_length": 6, "completions_to_log": 8, "rewards": [
            {"type": "contains"}, {"type": "regex", "pattern": "[a-m].*", "name": "a_to_m", "weight": 0.5},
            {"type": "length", "max_tokens": 3, "weight": 0.25}]},
    )  # fmt: skip


def jsonl(run: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (run / "3-train" / name).read_text().splitlines()]


def figures(row: dict) -> dict:
    """A metrics row without the measured memory and time (properties of the process, not the training)."""
    from vlmtune.observe import memory

    return {key: value for key, value in row.items() if key not in memory.KEYS and "runtime" not in key
            and "per_second" not in key and key != "step_time"}  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("whole")
    result = vlmtune("train", str(recipe(folder)), "--run-dir", str(folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run"


def test_a_grpo_run_stopped_by_sigterm_resumes_to_exactly_the_uninterrupted_run(
    uninterrupted, tmp_path: Path
):
    run = tmp_path / "run"
    stopped = with_fault("SIGTERM@step:2", "train", str(recipe(tmp_path)), "--run-dir", str(run))
    assert stopped.returncode in (128 + signal.SIGTERM, -signal.SIGTERM), stopped.stderr[-3000:]
    state = json.loads((run / "summary.json").read_text())
    assert state["status"] == "interrupted" and state["stopped_by"] == "SIGTERM"
    assert state["resume_from_step"] == 3 and not (run / "3-train/adapter").exists()
    assert state["saved_on_signal"]["step"] == 3, "the step in progress finished and was saved"
    assert f"vlmtune train --resume {run}" in stopped.stderr

    resumed = vlmtune("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {run} from checkpoint-3" in resumed.stdout

    mine, theirs = jsonl(run, "metrics.jsonl"), jsonl(uninterrupted, "metrics.jsonl")
    # train rows 1..5; held-out rows at 0 (before training: not run again by the resume), 3 and 5
    assert [(row["step"], "loss" in row) for row in mine] == [(row["step"], "loss" in row) for row in theirs]
    assert [row["step"] for row in mine if "eval_reward" in row] == [0, 3, 5]
    for resumed_row, whole_row in zip(mine, theirs, strict=True):
        assert figures(resumed_row) == figures(whole_row), f"step {resumed_row['step']} differs"
    assert any(row.get("reward_group_std", 0) > 0 and row["grad_norm"] > 0 for row in theirs[1:] if "loss" in row), (
        "the comparison covers steps that learnt something"
    )  # fmt: skip
    assert jsonl(run, "completions.jsonl") == jsonl(uninterrupted, "completions.jsonl"), (
        "the same completions sampled, each step's logged once"
    )
    adapter = "3-train/adapter/adapter_model.safetensors"
    assert (run / adapter).read_bytes() == (uninterrupted / adapter).read_bytes(), "final adapter differs"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done" and summary["stages"]["train"]["steps"] == STEPS


def test_resuming_a_finished_grpo_run_changes_nothing(uninterrupted):
    before = tree(uninterrupted)
    result = vlmtune("train", "--resume", str(uninterrupted))
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"run {uninterrupted} is finished ({STEPS} steps): nothing to resume, nothing changed"
        in result.stdout
    )
    assert tree(uninterrupted) == before, "not one file of the finished run changed"
