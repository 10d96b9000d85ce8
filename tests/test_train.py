"""`vlmtune train` end to end through the CLI, on the tiny model: the run folder and its promises."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

pytestmark = pytest.mark.slow

DEMO = ROOT / "data" / "demo"


def one_sample_repeated(folder: Path, copies: int = 8) -> Path:
    """A dataset of one two-image sample, repeated: the loss must fall when overfitting it."""
    shutil.copytree(DEMO / "images", folder / "images")
    line = (DEMO / "train.jsonl").read_text().splitlines()[4]  # a two-image, multi-turn sample
    assert json.loads(line)["messages"][0]["content"][1]["type"] == "image"
    (folder / "train.jsonl").write_text((line + "\n") * copies)
    return folder / "train.jsonl"


def recipe(folder: Path, **train) -> Path:
    one_sample_repeated(folder)
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl"},
        data={"train": "train.jsonl", "max_image_pixels": PIXEL_BUDGET},
        train={"max_steps": 12, "batch_size": 2, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant",
               "max_length": 256, "gradient_checkpointing": True, "save_steps": 6, **train},
    )  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train")
    result = vlmtune("train", str(recipe(folder)), "--run-dir", str(folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done" in result.stdout and "loss" in result.stdout
    return folder / "run"


def test_run_folder_has_every_artifact(trained: Path):
    expected = [
        "recipe.yaml", "resolved.yaml", "env.json", "summary.json",
        "1-load/model_report.json", "1-load/memory_estimate.json", "1-load/processor/tokenizer.json", "1-load/processor/chat_template.jinja",
        "2-lora/lora_plan.json", "2-lora/adapter_config.json",
        "3-train/metrics.jsonl", "3-train/data_report.json",
        "3-train/adapter/adapter_config.json", "3-train/adapter/adapter_model.safetensors",
        "3-train/adapter/tokenizer.json",
        "3-train/checkpoints/checkpoint-6", "3-train/checkpoints/checkpoint-12",
    ]  # fmt: skip
    missing = [name for name in expected if not (trained / name).exists()]
    assert not missing


def test_summary_and_reports_say_what_happened(trained: Path):
    summary = json.loads((trained / "summary.json").read_text())
    assert summary["status"] == "done"
    assert {s: v["status"] for s, v in summary["stages"].items()} == {
        "load": "done",
        "lora": "done",
        "train": "done",
    }
    assert summary["stages"]["train"]["steps"] == 12
    env = json.loads((trained / "env.json").read_text())
    assert env["device"] == "cpu" and env["packages"]["transformers"]
    data = json.loads((trained / "3-train/data_report.json").read_text())["train"]
    assert data["samples_total"] == data["samples_kept"] == 8 and data["images_total"] == 16
    plan = json.loads((trained / "2-lora/lora_plan.json").read_text())
    assert plan["trainable_params"]["vision"] > 0 and plan["trainable_params"]["language"] > 0
    assert plan["trainable_params"]["lm_head"] == 0
    report = json.loads((trained / "1-load/model_report.json").read_text())
    assert report["family"] == "qwen2_vl"


def test_metrics_rows_have_stable_keys_and_the_loss_falls(trained: Path):
    rows = [json.loads(line) for line in (trained / "3-train/metrics.jsonl").read_text().splitlines()]
    losses = [row for row in rows if "loss" in row]
    assert len(losses) == 12
    assert all({"step", "loss", "learning_rate", "epoch"} <= set(row) for row in losses)
    first, last = losses[0]["loss"], sum(r["loss"] for r in losses[-3:]) / 3
    assert last < 0.7 * first, f"overfitting one sample should cut the loss: {first} -> {last}"


def test_adapter_weights_changed_from_their_initialisation(trained: Path):
    from safetensors.torch import load_file

    weights = load_file(trained / "3-train/adapter/adapter_model.safetensors")
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b.values()), (
        "lora_B starts at zero; training moved it"
    )
    assert any("visual.blocks" in k for k in lora_b) and any("language_model" in k for k in lora_b)


def test_an_existing_run_folder_is_never_overwritten(trained: Path):
    before = (trained / "summary.json").read_text()
    result = vlmtune("train", str(trained.parent / "recipe.yaml"), "--run-dir", str(trained))
    assert result.returncode == 2 and "already exists" in result.stderr and "--resume" in result.stderr
    assert (trained / "summary.json").read_text() == before


def test_resume_continues_from_the_last_checkpoint(trained: Path, tmp_path: Path):
    # The run as a kill after step 7 leaves it: checkpoint-6 complete, no final adapter, running.
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    shutil.rmtree(copy / "3-train/checkpoints/checkpoint-12")
    shutil.rmtree(copy / "3-train/adapter")
    summary = json.loads((copy / "summary.json").read_text())
    summary["status"] = summary["stages"]["train"]["status"] = "running"
    (copy / "summary.json").write_text(json.dumps(summary))
    result = vlmtune("train", "--resume", str(copy), "--set", "train.max_steps=14")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "from checkpoint-6 (step 6)" in result.stdout
    steps = [json.loads(line)["step"] for line in (copy / "3-train/metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 15)), "the resumed run continues at step 7, each step logged once"
    assert "max_steps: 14" in (copy / "resolved.yaml").read_text()


def test_too_long_samples_error_with_the_index_or_are_dropped_and_counted(tmp_path: Path):
    path = recipe(tmp_path, max_length=40, max_steps=1)
    result = vlmtune("train", str(path), "--run-dir", str(tmp_path / "r1"))
    assert result.returncode == 2
    assert "sample 0" in result.stderr and "data.too_long: drop" in result.stderr
    summary = json.loads((tmp_path / "r1/summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["train"]["status"] == "failed"
    assert summary["stages"]["load"]["status"] == "done", "earlier stages keep their artifacts"

    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    short = json.dumps(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    )
    (tmp_path / "train.jsonl").write_text("\n".join([*lines[:2], short, short]) + "\n")
    result = vlmtune("train", str(path), "--run-dir", str(tmp_path / "r2"), "--set", "data.too_long=drop")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "r2/3-train/data_report.json").read_text())["train"]
    assert report["samples_kept"] == 2
    assert [d["index"] for d in report["dropped_too_long"]] == [0, 1]
    assert "max_length 40" in report["dropped_too_long"][0]["reason"]


def test_full_finetuning_trains_every_weight(tmp_path: Path):
    path = recipe(tmp_path, max_steps=2)
    result = vlmtune(
        "train", str(path), "--run-dir", str(tmp_path / "run"),
        "--set", "lora.method=full", "--set", "quantization.bits=null",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((tmp_path / "run/2-lora/lora_plan.json").read_text())
    assert plan["method"] == "full" and plan["trainable_total"] == plan["params_total"]
    assert (tmp_path / "run/3-train/model/model.safetensors").is_file()


def test_supervised_loss_matches_trls_loss_path_at_step_one(tmp_path: Path):
    path = recipe(tmp_path, max_steps=1)
    first = {}
    for switch in ("true", "false"):
        run = tmp_path / f"run-{switch}"
        result = vlmtune(
            "train", str(path), "--run-dir", str(run), "--set", f"train.supervised_loss={switch}"
        )
        assert result.returncode == 0, result.stderr[-3000:]
        first[switch] = json.loads((run / "3-train/metrics.jsonl").read_text().splitlines()[0])
    assert first["true"]["loss"] == pytest.approx(first["false"]["loss"], rel=2e-2)
    assert 0.0 <= first["true"]["padding_fraction"] < 1.0
