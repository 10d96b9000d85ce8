"""model.adapter: a run trains on from an earlier run's weights; an unusable run is refused first."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from posttrain_fixtures import fake_run

from vlmtune.after.trained import start_from
from vlmtune.errors import RunDirError
from vlmtune.recipe import LoraSection, ModelSection

from conftest import ROOT, write_recipe
from test_cli import vlmtune


def section(adapter: Path | None, name: str = "tiny:qwen2_vl") -> ModelSection:
    return ModelSection(name=name, adapter=str(adapter) if adapter else None)


def test_without_model_adapter_a_run_starts_from_the_base():
    start = start_from(section(None), LoraSection())
    assert start.model == section(None) and start.adapter is None


def test_a_finished_lora_run_gives_its_adapter_to_train_on(tmp_path: Path):
    run = fake_run(tmp_path / "sft")
    start = start_from(section(run), LoraSection())
    assert start.adapter == run / "3-train/adapter" and start.model.name == "tiny:qwen2_vl"


def test_a_finished_full_run_is_loaded_as_the_model(tmp_path: Path):
    run = fake_run(tmp_path / "full")
    resolved = yaml.safe_load((run / "resolved.yaml").read_text())
    resolved.update(quantization={"bits": None}, lora={"method": "full"})
    (run / "resolved.yaml").write_text(yaml.safe_dump(resolved))
    (run / "3-train/model").mkdir()
    start = start_from(section(run), LoraSection(method="full"))
    assert start.adapter is None and start.model.name == str(run / "3-train/model")


REFUSALS = [
    ("missing", "model.adapter: run folder {run} does not exist", "pass a folder that `vlmtune train` created"),
    ("interrupted", "model.adapter: run {run} did not finish training (status 'interrupted'",
     "continue it with `vlmtune train --resume {run}`"),
    ("other base", "model.adapter: run {run} trained tiny:qwen2_vl, not tiny:llava; its weights fit only",
     "set model.name: tiny:qwen2_vl, or pick a run of tiny:llava"),
    ("other shape", "(lora.finetune_vision_layers is false here but true there, lora.r is 8 here but 16 there)",
     "copy the lora section of {run}/resolved.yaml"),
    ("not a run", "model.adapter: {run} is not a vlmtune run folder (no summary.json)", "pass a folder"),
]  # fmt: skip


@pytest.mark.parametrize(("case", "message", "hint"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_an_unusable_run_is_refused_with_what_is_wrong_and_how_to_fix_it(tmp_path: Path, case, message, hint):
    run = tmp_path / "sft"
    model, lora = section(run), LoraSection()
    if case == "interrupted":
        fake_run(run, status="interrupted")
    elif case == "other base":
        fake_run(run)
        model = section(run, "tiny:llava")
    elif case == "other shape":
        fake_run(run)
        lora = LoraSection(r=8, finetune_vision_layers=False)
    elif case == "not a run":
        run.mkdir()
    with pytest.raises(RunDirError) as raised:
        start_from(model, lora)
    assert message.format(run=run) in raised.value.message
    assert hint.format(run=run) in raised.value.hint


def test_train_refuses_an_unfinished_start_run_before_loading_anything(tmp_path: Path):
    run = fake_run(tmp_path / "sft", status="interrupted")
    recipe = write_recipe(tmp_path, model={"name": "tiny:qwen2_vl", "adapter": str(run)},
                          data={"train": str(ROOT / "data/demo/train.jsonl")})  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(tmp_path / "new"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.adapter: run" in result.stdout + result.stderr and "did not finish training" in (
        result.stdout + result.stderr
    )
    summary = yaml.safe_load((tmp_path / "new/summary.json").read_text())
    assert summary["status"] == "failed" and summary["stages"]["load"]["status"] == "failed"
    assert not (tmp_path / "new/1-load/model_report.json").exists(), "no model was loaded"


def test_model_adapter_is_relative_to_the_recipe(tmp_path: Path):
    from vlmtune.recipe import load_recipe

    (tmp_path / "runs" / "sft").mkdir(parents=True)
    recipe = write_recipe(tmp_path, model={"name": "tiny:qwen2_vl", "adapter": "runs/sft"},
                          data={"train": "t.jsonl"})  # fmt: skip
    assert load_recipe(recipe).model.adapter == str(tmp_path / "runs" / "sft")


@pytest.mark.slow
def test_the_adapter_is_attached_trainable_with_its_weights_and_the_recipes_dropout(tmp_path: Path):
    import torch
    from safetensors.torch import load_file
    from test_dpo import trained_looking_adapter

    from vlmtune.recipe import QuantizationSection
    from vlmtune.stages import load, lora

    folder = trained_looking_adapter(tmp_path / "adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    loaded = load.load(ModelSection(name="tiny:qwen2_vl", dtype="float32"), QuantizationSection(bits=None), 12544,
                       "cpu")  # fmt: skip
    plan = lora.plan(loaded.model, loaded.family, LoraSection())
    continued = lora.apply(loaded.model, LoraSection(dropout=0.1), plan, seed=0, adapter=folder)
    params = dict(continued.named_parameters())
    assert len(saved) == sum("lora_" in n for n in params) > 0
    for key, value in saved.items():  # peft saves the names without the adapter's
        name = key.replace(".weight", ".default.weight")
        assert torch.equal(params[name].detach(), value), name
        assert params[name].requires_grad, f"{name} trains on"
    assert any(torch.count_nonzero(v) for k, v in saved.items() if "lora_B" in k), "not a fresh adapter"
    assert continued.peft_config["default"].lora_dropout == 0.1
    assert not any(p.requires_grad for n, p in params.items() if "lora_" not in n), "the base stays frozen"
