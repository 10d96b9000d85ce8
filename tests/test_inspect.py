"""`vlmtune inspect`: the component table and its JSON, from the load and lora stages, offline."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.model.families import family_names

from conftest import ROOT, write_recipe

runner = CliRunner()


def inspect_json(*args: str) -> dict:
    result = runner.invoke(app, ["inspect", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("family", family_names())
def test_json_per_component_for_every_family(family: str):
    result = inspect_json("--model", f"tiny:{family}")
    components = {c["name"]: c for c in result["components"]}
    assert list(components) == ["vision", "projector", "language", "lm_head", "other"]
    assert result["family"] == family and result["quantization"] == "4-bit nf4" and result["method"] == "lora"
    language, vision = components["language"], components["vision"]
    # Gates kept 16-bit: the tiny Qwen3.5 has one Gated DeltaNet layer (in_proj_a, in_proj_b), as MiniCPM-V
    # 4.6's Qwen3.5 decoder; the MoE adds a shared-expert gate per layer; Gemma 4 and Llama 4 keep their
    # Linear routers.
    kept = {"qwen3_5": 2, "qwen3_5_moe": 4, "gemma4": 2, "minicpmv4_6": 2, "llama4": 2}.get(family, 0)
    assert language["quantized_linears"] == language["linears"] - kept > 0
    assert "nf4" in language["dtypes"] and set(vision["dtypes"]) == {"bfloat16"}
    for name in ("vision", "projector", "lm_head"):
        assert components[name]["quantized_linears"] == 0
    # Default LoRA: both towers, nothing else; trainable params only where adapters are.
    assert vision["lora_targets"] > 0 and language["lora_targets"] > 0
    assert vision["trainable_params"] > 0 and language["trainable_params"] > 0
    assert components["projector"]["trainable_params"] == components["lm_head"]["trainable_params"] == 0
    assert result["lora_targets"] == sum(c["lora_targets"] for c in components.values())
    assert result["trainable_params"] == sum(c["trainable_params"] for c in components.values())
    assert result["total_params"] == sum(c["params"] for c in components.values())


def test_a_recipe_decides_quantization_and_targets(tmp_path):
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:llava"},
        quantization={"bits": None},
        lora={"finetune_vision_layers": False, "train_projector": True},
        data={"train": str(ROOT / "data" / "demo" / "train.jsonl")},
    )
    result = inspect_json(str(recipe))
    components = {c["name"]: c for c in result["components"]}
    assert result["quantization"] is None
    assert all(c["quantized_linears"] == 0 for c in components.values())
    assert components["vision"]["lora_targets"] == components["vision"]["trainable_params"] == 0
    assert components["projector"]["trainable_params"] == components["projector"]["params"] > 0
    assert result["modules_to_save"] == ["model.multi_modal_projector"]


def test_tied_lm_head_is_reported():
    components = {c["name"]: c for c in inspect_json("--model", "tiny:gemma3")["components"]}
    assert components["lm_head"]["tied_to_embeddings"] is True and components["lm_head"]["params"] == 0


def test_the_table_names_every_component():
    result = runner.invoke(app, ["inspect", "--model", "tiny:qwen2_vl"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for word in ("vision", "projector", "language", "lm_head", "nf4", "LoRA targets regex"):
        assert word in result.stdout


def test_recipe_or_model_but_not_both_and_unknown_tiny_family():
    for argv in (
        ["inspect"],
        ["inspect", "r.yaml", "--model", "tiny:llava"],
        ["inspect", "--model", "tiny:lava"],
    ):
        assert runner.invoke(app, argv).exit_code != 0
    # Through the real entry point: a message and a hint, exit 2, no traceback.
    done = subprocess.run(
        [sys.executable, "-c", "from vlmtune.cli import main; main()", "inspect", "--model", "tiny:lava"],
        capture_output=True,
        text=True,
    )
    assert (
        done.returncode == 2 and "did you mean tiny:llava" in done.stderr and "Traceback" not in done.stderr
    )


def test_the_command_module_imports_nothing_heavy():
    code = "import sys, vlmtune.commands.inspect; print(any(m in sys.modules for m in ('torch', 'transformers')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize(
    "recipe", sorted((ROOT / "recipes").glob("*/*_qlora.yaml")), ids=lambda p: p.parent.name
)
def test_each_family_recipe_runs_on_its_tiny_model(recipe):
    """A family's example recipe, pointed at that family's tiny model, loads and plans as written."""
    family = recipe.parent.name
    result = inspect_json(str(recipe), "--set", f"model.name=tiny:{family}")
    assert result["family"] == family and result["quantization"] == "4-bit nf4"
    assert result["lora_targets"] > 0 and result["trainable_params"] > 0


def test_set_needs_a_recipe():
    assert runner.invoke(app, ["inspect", "--model", "tiny:llava", "--set", "lora.r=8"]).exit_code != 0
