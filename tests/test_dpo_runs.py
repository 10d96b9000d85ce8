"""DPO runs through the pipeline: continuing an SFT run's adapter, and resuming from a checkpoint
with its frozen reference intact."""

from __future__ import annotations

from pathlib import Path

import pytest
from preference_task import write_task

from conftest import write_recipe

TRAIN = {"batch_size": 4, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant", "max_length": 256,
         "gradient_checkpointing": False}  # fmt: skip
MODEL = {"name": "tiny:qwen2_vl", "dtype": "float32"}


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_run(folder: Path, callbacks: list | None = None, **sections):
    from vlmtune import pipeline
    from vlmtune.recipe import load_recipe

    folder.mkdir()
    path = write_recipe(folder, quantization={"bits": None}, output={"dir": "runs"}, **sections)
    return pipeline.run(load_recipe(path), path.read_text(), folder.name, folder / "run", callbacks=callbacks)


@pytest.mark.slow
def test_a_dpo_run_from_an_sft_run_resumes_with_its_reference(tmp_path: Path, one_thread):
    from vlmtune import pipeline

    task = write_task(tmp_path / "task", n_train=8, n_held_out=0)
    data = {"train": str(task / "pairs.jsonl"), "max_image_pixels": 12544, "shuffle": False}
    sft = train_run(tmp_path / "sft", model=MODEL, train={**TRAIN, "max_steps": 2},
                    data={**data, "train": str(task / "sft.jsonl")})  # fmt: skip
    # SFT trains on from its own earlier run too: it starts where that run ended, not at a fresh adapter.
    again = train_run(tmp_path / "sft-again", model={**MODEL, "adapter": str(sft.path)},
                      train={**TRAIN, "max_steps": 1}, data={**data, "train": str(task / "sft.jsonl")})  # fmt: skip
    sft_losses = sft.losses()
    assert again.losses()[0] < sft_losses[0] - 1.0, (sft_losses, again.losses())

    # an eval at step 3 (after the resume): its eval_num_tokens counts the tokens trained on since step 1
    dpo = {"model": {**MODEL, "adapter": str(sft.path)}, "data": {**data, "eval": data["train"]},
           "dpo": {"sft_weight": 0.5}}  # fmt: skip
    stepping = {**TRAIN, "objective": "dpo", "max_steps": 3, "save_steps": 2, "eval_steps": 3}
    whole = train_run(tmp_path / "whole", train=stepping, **dpo)

    # The same run stopped after its checkpoint at step 2 (Ctrl-C as step 3 begins), then resumed.
    from transformers import TrainerCallback

    from vlmtune.runs.rundir import RunDir

    class CtrlCAtStep3(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                raise KeyboardInterrupt

    with pytest.raises(pipeline.Stopped):
        train_run(tmp_path / "cut", train=stepping, callbacks=[CtrlCAtStep3()], **dpo)
    cut = RunDir(tmp_path / "cut" / "run")
    pipeline.resume(cut.path)

    whole_rows, resumed_rows = (
        whole.read_jsonl("3-train/metrics.jsonl"),
        cut.read_jsonl("3-train/metrics.jsonl"),
    )
    train_rows = [r for r in resumed_rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3], "the resumed run continues at step 3"
    for key in ("loss", "reward_chosen", "reward_rejected"):  # a wrong reference would move the rewards
        assert train_rows[-1][key] == pytest.approx(
            [r for r in whole_rows if "loss" in r][-1][key], abs=1e-4
        ), key
    # the evals at step 0 (before training) and at step 3; the one after the resume is compared
    [_, whole_eval], [_, resumed_eval] = (
        [x for x in rows if "eval_loss" in x] for rows in (whole_rows, resumed_rows)
    )
    assert resumed_eval["eval_num_tokens"] == whole_eval["eval_num_tokens"] > 0, (
        "the token count carried over"
    )
    assert train_rows[0]["reward_margin"] == 0.0, "step 1: the model equals its reference, the SFT adapter"
    checkpoint = cut.checkpoints()[0]
    assert (checkpoint / "ref" / "adapter_model.safetensors").is_file(), "checkpoints keep the frozen copy"
    assert not (Path(cut.summary()["output"]) / "ref").exists(), "the final adapter is the trained one only"


@pytest.mark.slow
def test_preference_accuracy_after_training_and_from_vlmtune_eval(tmp_path: Path, one_thread):
    import json

    from vlmtune.scoring import METRICS

    from conftest import ROOT
    from test_cli import vlmtune

    pairs = ROOT / "tests" / "data" / "preference"
    run = train_run(
        tmp_path / "dpo",
        model=MODEL,
        data={"train": str(pairs / "trl.jsonl"), "eval": str(pairs / "trl.jsonl"), "max_image_pixels": 12544},
        train={**TRAIN, "objective": "dpo", "max_steps": 2, "save_steps": 1000, "eval_generate": True},
    )
    stage = run.summary()["stages"]["eval"]
    report = run.read_json("4-eval/eval_report.json")
    assert stage["preference_accuracy"] == report["preference_accuracy"] and report["n"] == 3
    assert set(report["base"]) == {"preference_accuracy", "logp_margin", *METRICS}  # the answer metrics too
    rows = report["predictions"]
    assert [r["reference"] for r in rows] == ["Red.", "The first.", "Four."]
    assert [r["rejected"] for r in rows] == ["Blue.", "The second.", "Three."]
    assert report["preference_accuracy"] == sum(r["adapter_prefers_chosen"] for r in rows) / 3
    assert report["base"]["preference_accuracy"] == sum(r["base_prefers_chosen"] for r in rows) / 3

    # The same pairs in ms-swift's layout, through the command line: the same preferences.
    result = vlmtune("eval", str(run.path), "--data", str(pairs / "swift.jsonl"), "--max-new-tokens", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((run.path / "4-eval/eval_report.json").read_text())
    assert "preference accuracy" in result.stdout
    for key in ("preference_accuracy", "logp_margin"):
        assert again[key] == pytest.approx(report[key], abs=1e-4)
        assert again["base"][key] == pytest.approx(report["base"][key], abs=1e-4)
