"""A new user's first hour: CPU threads, terminal-safe output, narrow terminals, defaults said aloud,
summaries of noisy curves, and what estimate-memory says when nothing fits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from test_cli import vlmtune

# --- CPU threads ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "device", "env", "cores", "world", "expected"),
    [
        ("auto", "cpu", None, 2, 1, 1),  # the shared 2-core machine: 1 thread (docs/benchmarks.md)
        ("auto", "cpu", None, 4, 1, 1),
        ("auto", "cpu", None, 16, 1, None),  # a big machine: torch's default
        ("auto", "cpu", None, 16, 8, 1),  # 8 ranks on 16 cores: 2 cores each
        ("auto", "cpu", "3", 2, 1, None),  # OMP_NUM_THREADS set (torchrun sets 1): respected
        ("auto", "cuda", None, 2, 1, None),  # a CUDA run is never touched
        (3, "cuda", None, 2, 1, None),
        (0, "cpu", None, 2, 1, None),  # 0 = torch's default
        (3, "cpu", None, 2, 1, 3),
    ],
)
def test_cpu_threads_auto_picks_one_thread_on_small_machines(monkeypatch, setting, device, env, cores, world,
                                                            expected):  # fmt: skip
    from vlmtune.model import checkpoint

    if env is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", env)
    monkeypatch.setattr(checkpoint, "_usable_cores", lambda: cores)
    assert checkpoint.cpu_threads(setting, device, world) == expected


def test_cpu_threads_key_is_in_the_schema_and_refuses_negatives(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text("")
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: tiny:qwen2_vl}\ndata: {train: train.jsonl}\ntrain: {cpu_threads: -1}\n")
    result = vlmtune("validate", str(path))
    assert (
        result.returncode == 2
        and "train.cpu_threads (line 3): a thread count cannot be negative" in result.stderr
    )
    result = vlmtune("validate", str(path), "--set", "train.cpu_threads=auto")
    assert result.returncode == 0 and "cpu_threads: auto" in result.stdout


def test_apply_sets_torch_threads_on_cpu_only(monkeypatch):
    import torch

    from vlmtune.model import checkpoint

    before = torch.get_num_threads()
    try:
        assert checkpoint.apply_cpu_threads(1, "cpu") == 1 and torch.get_num_threads() == 1
        torch.set_num_threads(2)
        assert checkpoint.apply_cpu_threads(1, "cuda") is None and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# --- output that survives a terminal ---------------------------------------------------------------


def test_answers_are_escaped_for_a_terminal():
    from vlmtune.after.generate import printable

    raw = "red\x1b[2J\x1b]0;owned\x07 circle\u200b\n\tok é 形"
    shown = printable(raw)
    assert "\x1b" not in shown and "\x07" not in shown and "\u200b" not in shown
    assert shown == "red\\x1b[2J\\x1b]0;owned\\x07 circle\\u200b\n\tok é 形"


def test_help_keeps_descriptions_readable_at_80_columns():
    result = vlmtune("estimate-memory", "--help", env_extra={"COLUMNS": "80"})
    assert result.returncode == 0
    line = next(line for line in result.stdout.splitlines() if "Quantize the 4-bit constants" in line)
    assert "Quantize the 4-bit constants too." in line, "the description is not squeezed into a sliver"
    assert max(len(line) for line in result.stdout.splitlines()) <= 80


def test_train_help_names_all_four_objectives():
    result = vlmtune("train", "--help", env_extra={"COLUMNS": "120"})
    assert result.returncode == 0 and "sft, dpo, kto or grpo" in result.stdout and "KTO" in result.stdout


def _run_folder(root: Path, name: str, evaluated: dict | None = None) -> Path:
    run = root / name
    (run / "3-train").mkdir(parents=True)
    stages = {"train": {"status": "done", "steps": 60, "seconds": 80.0}}
    if evaluated:
        stages["eval"] = {"status": "done", **evaluated}
    summary = {"recipe": "demo", "status": "done", "created": "2026-12-05T13:00:00", "stages": stages,
               "seconds": 80.4}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "resolved.yaml").write_text(
        "model: {name: Qwen/Qwen2.5-VL-7B-Instruct}\ntrain: {objective: sft}\n"
    )
    rows = [{"step": s, "loss": 7.0 - s * 0.1} for s in range(1, 61)]
    (run / "3-train/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_runs_at_80_columns_keeps_every_field_and_shows_the_eval_score(tmp_path: Path):
    _run_folder(tmp_path, "qwen25-7b-chartqa-20261205-130000", {"n": 9, "exact_match": 0.5, "contains": 0.75})
    result = vlmtune("runs", str(tmp_path), env_extra={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "qwen25-7b-chartqa-20261205-130000" in lines[0] and "6.900 -> 1.000" in lines[0]
    assert "exact 0.500" in lines[1], "too long for the first line: the score leads the second"
    assert "Qwen/Qwen2.5-VL-7B-Instruct, sft" in lines[1], "the model is not dropped"
    listed = json.loads(vlmtune("runs", str(tmp_path), "--json").stdout)[0]
    assert (listed["eval_metric"], listed["eval_score"]) == ("exact_match", 0.5)
    wide = vlmtune("runs", str(tmp_path), env_extra={"COLUMNS": "160"}).stdout.splitlines()
    assert wide[0].split()[:7] == ["run", "model", "objective", "status", "steps", "loss", "eval"]


# --- noisy curves in short -------------------------------------------------------------------------


def test_noisy_series_are_summarised_by_the_means_of_their_first_and_last_steps():
    from vlmtune.observe import curves

    rewards = [0.5, 0.0, 0.25, 0.75, 0.5] * 4 + [1.0, 0.5, 0.75, 1.0, 0.5] * 4  # 40 steps
    rows = [{"step": i + 1, "loss": 1.0, "reward": r} for i, r in enumerate(rewards)]
    first, last, n = curves.mean_ends(tuple(rewards))
    assert (
        n == 8
        and first == pytest.approx(sum(rewards[:8]) / 8)
        and last == pytest.approx(sum(rewards[-8:]) / 8)
    )
    figures = curves.headline_means(rows)
    assert figures["reward_first_mean"] == pytest.approx(first) and figures["mean_window"] == 8
    lines = dict(curves.summary_lines(curves.extract(rows)))
    assert f"{first:.3f} -> {last:.3f} (means of the first and last 8 steps)" in lines["reward"]
    smooth = curves.smoothed(tuple(rewards), 4)
    assert smooth[3] == pytest.approx(sum(rewards[:4]) / 4) and len(smooth) == len(rewards)
    assert math.isnan(curves.smoothed((math.nan,))[0])


def test_a_diverged_loss_still_shows_its_nan():
    from vlmtune.observe import curves

    rows = [{"step": i + 1, "loss": 1.0} for i in range(30)] + [{"step": 31, "loss": math.nan}]
    assert "-> nan" in dict(curves.summary_lines(curves.extract(rows)))["loss"]


# --- estimate-memory when nothing fits ------------------------------------------------------------


@pytest.mark.slow
def test_estimate_memory_says_what_would_fit():
    result = vlmtune("estimate-memory", "--model", "Qwen/Qwen2-VL-2B-Instruct", "--full", "--gpu-memory", "8GB",
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["fits"]["fits"] is False
    assert any(line.startswith("4-bit QLoRA") for line in report["would_fit"])
    assert any("GPUs under FSDP" in line for line in report["would_fit"])


def test_eval_against_the_start_run_needs_a_run_that_started_from_one(tmp_path: Path):
    from posttrain_fixtures import fake_run

    run = fake_run(tmp_path / "run")
    result = vlmtune("eval", str(run), "--against", "start")
    assert result.returncode == 2 and "did not train on from an earlier run" in result.stderr
    result = vlmtune("eval", str(run), "--against", "sft")
    assert result.returncode == 2 and "neither base nor start" in result.stderr


# --- data check --show -------------------------------------------------------------------------------


def test_data_check_show_renders_samples_with_image_tokens_and_loss_marked():
    result = vlmtune("data", "check", "recipes/demo.yaml", "--show", "1", env_extra={"COLUMNS": "100"})
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "train sample 0: 48 tokens, 6 image tokens, 7 carry loss" in out
    assert "<|vision_start|>[<|image_pad|> x4]<|vision_end|>What color is the shape?" in out
    assert "⟦The circle is yellow.<|im_end|>" in out and "⟦<|im_start|>" not in out, (
        "the prompt carries no loss"
    )
    assert "train: 499 tokens carry loss over 48 usable samples" in out and "eval sample 0:" in out
    as_json = vlmtune("data", "check", "recipes/demo.yaml", "--show", "1", "--json")
    assert json.loads(as_json.stdout)["train"]["tokens_with_loss"] == 499


def test_data_check_show_with_the_whole_answer_trained_marks_the_prompt_too():
    result = vlmtune("data", "check", "recipes/demo.yaml", "--show", "1", "--set", "data.train_on_responses_only=false",
                     env_extra={"COLUMNS": "100"})  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "⟦<|im_start|>system" in result.stdout and "[<|image_pad|> x4]" in result.stdout


def test_the_colour_pairs_are_what_their_script_writes(tmp_path: Path):
    import shutil
    import subprocess
    import sys

    from conftest import ROOT

    colours = ROOT / "data" / "colours"
    for name in ("train.jsonl", "eval.jsonl"):
        shutil.copy(colours / name, tmp_path / name)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_colour_pairs.py"), str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    for name in ("pairs.jsonl", "eval_pairs.jsonl"):
        assert (tmp_path / name).read_text() == (colours / name).read_text(), name
    first = json.loads((colours / "pairs.jsonl").read_text().splitlines()[0])
    assert first["chosen"][0]["content"][0]["text"] != first["rejected"][0]["content"][0]["text"]


def test_the_colour_dpo_recipe_validates():
    result = vlmtune("validate", "recipes/colours_dpo.yaml")
    assert result.returncode == 2 and "model.adapter: folder not found" in result.stderr, (
        "the SFT run it starts from is named, and its absence found before anything loads"
    )
    result = vlmtune("validate", "recipes/colours_dpo.yaml", "--set", "model.adapter=null")
    assert result.returncode == 0, result.stderr


def test_the_planned_epochs_count_as_the_trainer_counts_them():
    from types import SimpleNamespace

    from vlmtune.training.callbacks import epochs_line, planned_epochs

    args = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=1)
    state = SimpleNamespace(max_steps=60)
    assert planned_epochs(args, state, list(range(12))) == 10.0, "12 batches = 6 steps an epoch"
    assert planned_epochs(args, state, None) is None
    assert epochs_line(60, args, 10.0) == "60 steps of effective batch 8 = 10.00 epochs of the training set"
