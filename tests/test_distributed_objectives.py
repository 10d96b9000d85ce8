"""DPO and GRPO under torchrun on CPU (gloo, DDP): the same launch behaviour as SFT's
(tests/test_distributed.py), through the hooks they share in vlmtune.stages.common.

DPO is deterministic, so two ranks of batch 1 must match one rank of batch 2 (the same
tolerances as SFT: only the order of the gradient sums differs). GRPO samples its completions
with each rank's own random stream, so its run is checked for what a launch must get right:
whole groups gathered across ranks into one log, one run folder, one adapter.

Both objectives also resume under the same launch: a copy of the 2-rank run as it was when
stopped after its step-2 checkpoint (test_distributed.stopped_after_step_two) is continued with
`torchrun ... vlmtune train --resume RUN` to the uninterrupted run's figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from preference_task import write_task
from test_distributed import (
    LOSS_TOLERANCE,
    WEIGHT_TOLERANCE,
    losses,
    single,
    stopped_after_step_two,
    succeeded,
    tensors,
    the_run_folder,
    torchrun,
)
from test_grpo_resume import figures

from conftest import PIXEL_BUDGET, ROOT, write_recipe

pytestmark = pytest.mark.slow

DDP_FIGURES = {"world_size": 2, "nodes": 1, "strategy": "ddp"}


def launch_recipe(folder: Path, *, data: dict, train: dict, **sections) -> Path:
    """A float32 LoRA recipe (vision and language), a checkpoint at step 2, a 60 s collective timeout."""
    folder.mkdir(parents=True, exist_ok=True)
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl", "dtype": "float32"},
        quantization={"bits": None},
        lora={"finetune_vision_layers": True, "finetune_language_layers": True},
        data={"max_image_pixels": PIXEL_BUDGET, **data},
        train={
            "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant", "max_length": 256,
            "gradient_checkpointing": False, "save_steps": 2, "logging_steps": 1,
            "distributed": {"timeout": 60}, **train,
        },
        output={"dir": "runs"},
        **sections,
    )  # fmt: skip


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "3-train" / "metrics.jsonl").read_text().splitlines()]


def assert_written_once(run: Path, stdout: str, steps: int, effective_batch: int) -> None:
    """One finished run folder, its launch recorded, every step logged once, the summary printed once."""
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "done"
    assert summary["distributed"] == {
        **DDP_FIGURES, "batch_size_per_device": effective_batch // 2, "grad_accum": 1,
        "effective_batch": effective_batch,
    }  # fmt: skip
    assert [row["step"] for row in metrics(run) if "loss" in row] == list(range(1, steps + 1))
    assert stdout.count("done in") == 1
    checkpoint = run / "3-train" / "checkpoints" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}


def assert_resumed_to_the_end(stopped: Path, steps: int) -> None:
    """The resumed run started from checkpoint-2 (whose completion marker rank 0 wrote after both ranks
    had saved), finished, wrote its one adapter, and logged every step once."""
    summary = json.loads((stopped / "summary.json").read_text())
    assert summary["status"] == "done"
    [resume] = summary["resumes"]
    assert (resume["from_checkpoint"], resume["from_step"], resume["skipped"]) == ("checkpoint-2", 2, {})
    assert [row["step"] for row in metrics(stopped)] == list(range(1, steps + 1))
    assert len(list((stopped / "3-train" / "adapter").glob("*.safetensors"))) == 1


def trained_adapter(run: Path) -> dict:
    """The final adapter: the trained one alone (no frozen "ref" copy), every lora_B moved off zero."""
    adapter = run / "3-train" / "adapter"
    assert not (adapter / "ref").exists() and not (run / "3-train" / "model").exists()
    weights = tensors(adapter / "adapter_model.safetensors")
    trained = [name for name in weights if "lora_B" in name]
    assert any(".visual." in name for name in trained) and any(".language_model." in name for name in trained)
    assert all(weights[name].abs().sum() > 0 for name in trained)
    return weights


# --- DPO ----------------------------------------------------------------------------------------


def dpo_recipe(folder: Path, batch_size: int) -> Path:
    task = write_task(folder / "task", n_train=6, n_held_out=0)
    return launch_recipe(
        folder, data={"train": str(task / "pairs.jsonl")},
        train={"objective": "dpo", "max_steps": 3, "batch_size": batch_size},
    )  # fmt: skip


@pytest.fixture(scope="module")
def dpo_on_two_ranks(tmp_path_factory) -> tuple[Path, str]:
    """3 steps of DPO on two ranks x batch 1, checkpoints at steps 2 and 3: the run folder, stdout."""
    path = dpo_recipe(tmp_path_factory.mktemp("dpo_ddp"), batch_size=1)
    result = torchrun(path)
    succeeded(result)
    return the_run_folder(path), result.stdout


def test_dpo_on_two_ranks_matches_one_rank_of_twice_the_batch(dpo_on_two_ranks, tmp_path: Path):
    run, stdout = dpo_on_two_ranks
    assert_written_once(run, stdout, steps=3, effective_batch=2)
    assert "effective batch 2 = batch_size 1 x grad_accum 1 x 2 ranks" in stdout
    report = json.loads((run / "3-train" / "data_report.json").read_text())["train"]
    assert report["samples_kept"] == 6

    one_path = dpo_recipe(tmp_path / "one", batch_size=2)
    succeeded(single(one_path))
    one = the_run_folder(one_path)
    a, b = losses(run), losses(one)
    assert len(a) == len(b) == 3 and a[0] == pytest.approx(0.6931, abs=1e-4)  # ln 2: policy equals reference
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOSS_TOLERANCE, (a, b)
    # The preference metrics are every rank's pairs, as one process sees both.
    for key in ("reward_margin", "preference_accuracy"):
        expected = [row[key] for row in metrics(one)]
        assert [row[key] for row in metrics(run)] == pytest.approx(expected, abs=1e-4), key
    sharded, whole = trained_adapter(run), trained_adapter(one)
    assert max(float((sharded[k] - whole[k]).abs().max()) for k in whole) < WEIGHT_TOLERANCE


def test_a_two_rank_dpo_run_resumes_under_the_same_launch(dpo_on_two_ranks, tmp_path: Path):
    """Step 3 trains again from checkpoint-2 on both ranks (each its own half of the pairs, the frozen
    reference adapter restored with the trained one) to the uninterrupted run's loss, preference
    metrics and adapter, within the tolerances above."""
    run, _ = dpo_on_two_ranks
    stopped = stopped_after_step_two(run, tmp_path / run.name)
    succeeded(torchrun("--resume", stopped))
    assert_resumed_to_the_end(stopped, steps=3)
    a, b = losses(run), losses(stopped)
    assert len(a) == len(b) == 3
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < LOSS_TOLERANCE, (a, b)
    for key in ("reward_margin", "preference_accuracy"):
        expected = [row[key] for row in metrics(run)]
        assert [row[key] for row in metrics(stopped)] == pytest.approx(expected, abs=1e-4), key
    before, resumed = trained_adapter(run), trained_adapter(stopped)
    assert max(float((before[k] - resumed[k]).abs().max()) for k in before) < WEIGHT_TOLERANCE


# --- GRPO ---------------------------------------------------------------------------------------


GRPO_STEPS = 3


def completions(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "3-train" / "completions.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def grpo_on_two_ranks(tmp_path_factory) -> tuple[Path, str]:
    """3 steps of GRPO on two ranks, checkpoints at steps 2 and 3: the run folder, stdout."""
    path = launch_recipe(
        tmp_path_factory.mktemp("grpo_ddp"),
        data={"train": str(ROOT / "data" / "demo" / "train.jsonl")},
        train={"objective": "grpo", "max_steps": GRPO_STEPS, "batch_size": 4, "lr": 1e-3},
        grpo={"num_generations": 4, "max_completion_length": 6, "completions_to_log": 8, "rewards": [
            {"type": "contains"}, {"type": "regex", "pattern": "[a-m].*", "name": "a_to_m"}]},
    )  # fmt: skip
    result = torchrun(path)
    succeeded(result)
    return the_run_folder(path), result.stdout


def test_grpo_on_two_ranks_logs_whole_groups_from_both_and_saves_one_adapter(grpo_on_two_ranks):
    """Each rank samples one prompt's group of 4 per step; rank 0 logs both groups and the mean reward."""
    run, stdout = grpo_on_two_ranks
    assert_written_once(run, stdout, steps=GRPO_STEPS, effective_batch=8)
    rows = completions(run)
    steps = range(1, GRPO_STEPS + 1)
    assert [row["step"] for row in rows] == [step for step in steps for _ in range(8)]
    for step in steps:
        groups = [row["sample"] for row in rows if row["step"] == step]
        # Two prompts a step, one per rank, each with its whole group of four completions.
        assert len(set(groups)) == 2 and all(groups.count(sample) == 4 for sample in groups), groups
    train = [row for row in metrics(run) if "loss" in row]
    for row, step in zip(train, steps, strict=True):  # the logged reward is the mean over both ranks' groups
        logged = [r["reward"] for r in rows if r["step"] == step]
        assert row["reward"] == pytest.approx(sum(logged) / len(logged), abs=1e-5)
    summary = json.loads((run / "summary.json").read_text())["stages"]["train"]
    assert summary["first_reward"] == train[0]["reward"] and summary["last_reward"] == train[-1]["reward"]
    trained_adapter(run)


def test_a_two_rank_grpo_run_resumes_under_the_same_launch_to_the_same_completions(
    grpo_on_two_ranks, tmp_path: Path
):
    """Exact on CPU, as for one process (tests/test_grpo_resume.py): each rank restores its own RNG
    state (rng_state_{rank}.pth) before step 3, so it samples the same completions of the same prompt
    (the prompt order comes from the sampler reseeded by train.seed and the epoch, then sharded
    across the ranks as before); the rewards, their mean over both ranks, the loss, every metrics row
    and the adapter's bytes repeat with a tolerance of zero. The stopped copy keeps step 3's logged
    completions, as a run killed after logging them would: the resume drops them and logs them once."""
    run, _ = grpo_on_two_ranks
    stopped = stopped_after_step_two(run, tmp_path / run.name)
    assert [row["step"] for row in completions(stopped)][-1] == GRPO_STEPS  # the stale rows are there
    succeeded(torchrun("--resume", stopped))
    assert_resumed_to_the_end(stopped, steps=GRPO_STEPS)
    assert completions(stopped) == completions(run)
    assert [figures(row) for row in metrics(stopped)] == [figures(row) for row in metrics(run)]
    adapter = Path("3-train", "adapter", "adapter_model.safetensors")
    assert (stopped / adapter).read_bytes() == (run / adapter).read_bytes()
