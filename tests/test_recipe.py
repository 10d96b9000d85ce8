"""The recipe schema: strict sections, every problem at once, line numbers, suggestions."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from vlmtune.errors import RecipeError
from vlmtune.recipe import load_recipe, parse_recipe, recipe_json_schema
from vlmtune.recipe.reference import recipe_reference

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
MINIMAL = "model:\n  name: tiny:qwen2_vl\ndata:\n  train: train.jsonl\n"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_shipped_recipe_validates_and_documents_its_command(path: Path):
    recipe = load_recipe(path)
    assert recipe.model.name
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith(("# vlmtune ", "# torchrun ")), (
        "a recipe starts with the command that runs it"
    )
    assert str(path.relative_to(ROOT)) in first_line


def test_several_mistakes_are_reported_together_with_lines():
    text = (
        "model:\n"  # 1
        "  name: tiny:qwen2_vl\n"  # 2
        "  dtyp: bfloat16\n"  # 3
        "lora:\n"  # 4
        "  r: -4\n"  # 5
        "data:\n"  # 6
        "  train: a.jsonl\n"  # 7
        "train:\n"  # 8
        "  lr: fast\n"  # 9
        "  batchsize: 2\n"  # 10
    )
    with pytest.raises(RecipeError) as info:
        parse_recipe(text)
    problems = info.value.problems
    assert len(problems) == 4
    joined = "\n".join(problems)
    assert "model.dtyp (line 3): unknown key; did you mean `model.dtype`?" in joined
    assert "lora.r (line 5)" in joined and "greater than 0" in joined
    assert "train.lr (line 9)" in joined and "'fast'" in joined
    assert "train.batchsize (line 10): unknown key; did you mean `train.batch_size`?" in joined


def test_key_in_the_wrong_section_is_pointed_to_its_section():
    with pytest.raises(RecipeError) as info:
        parse_recipe(MINIMAL + "train:\n  r: 8\n")
    assert "it belongs in the `lora` section" in info.value.problems[0]


def test_misspelt_section_and_missing_section():
    with pytest.raises(RecipeError) as info:
        parse_recipe("model:\n  name: tiny:qwen2_vl\ndatta:\n  train: a.jsonl\n")
    joined = "\n".join(info.value.problems)
    assert "datta (line 3): unknown key; did you mean `data`?" in joined
    assert "data: required, but missing" in joined


def test_unknown_tiny_family_suggests_the_closest():
    with pytest.raises(RecipeError) as info:
        parse_recipe(MINIMAL.replace("qwen2_vl", "qwen2vl"))
    assert "did you mean tiny:qwen2_vl?" in info.value.problems[0]


def test_overrides_are_applied_and_type_checked():
    recipe = parse_recipe(MINIMAL, overrides=["lora.r=32", "quantization.bits=null", "train.lr=1e-4"])
    assert recipe.lora.r == 32 and recipe.quantization.bits is None and recipe.train.lr == 1e-4
    with pytest.raises(RecipeError) as info:
        parse_recipe(MINIMAL, overrides=["train.batch_size=two", "lora.rank=8"])
    joined = "\n".join(info.value.problems)
    assert "train.batch_size (from --set)" in joined
    assert "lora.rank (from --set): unknown key; did you mean `lora.r`?" in joined


def test_malformed_override_says_how_to_write_one():
    with pytest.raises(RecipeError, match="bad override"):
        parse_recipe(MINIMAL, overrides=["lora.r"])


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"finetune_vision_layers": False, "finetune_language_layers": False}, "would train nothing"),
        ({"finetune_attention_modules": False, "finetune_mlp_modules": False}, "would train nothing"),
    ],
)
def test_all_toggles_off_is_an_error(lora, message):
    import yaml

    with pytest.raises(RecipeError, match=message):
        parse_recipe(MINIMAL + yaml.safe_dump({"lora": lora}))


def test_explicit_target_regex_lifts_the_toggle_check():
    import yaml

    lora = {"finetune_vision_layers": False, "finetune_language_layers": False, "target_modules": ".*q_proj"}
    assert parse_recipe(MINIMAL + yaml.safe_dump({"lora": lora})).lora.target_modules == ".*q_proj"


def test_full_finetuning_of_a_quantized_model_is_refused():
    with pytest.raises(RecipeError, match="full cannot train quantized weights"):
        parse_recipe(MINIMAL + "lora:\n  method: full\n")
    assert (
        parse_recipe(MINIMAL + "lora:\n  method: full\nquantization:\n  bits: null\n").lora.method == "full"
    )


def test_recipe_is_frozen():
    recipe = parse_recipe(MINIMAL)
    with pytest.raises(ValidationError, match="frozen"):
        recipe.lora.r = 4  # type: ignore[misc]


def test_paths_are_relative_to_the_recipe_file(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path)
    assert recipe.data.train == str((tmp_path / "sub" / "train.jsonl").resolve())
    assert recipe.output.dir == str((tmp_path / "sub" / "runs").resolve())
    assert recipe.model.name == "tiny:qwen2_vl"


def test_hub_ids_are_left_alone(tmp_path: Path):
    recipe = parse_recipe(MINIMAL.replace("tiny:qwen2_vl", "Qwen/Qwen2-VL-2B-Instruct"), base_dir=tmp_path)
    assert recipe.model.name == "Qwen/Qwen2-VL-2B-Instruct"


def test_missing_recipe_and_bad_yaml(tmp_path: Path):
    with pytest.raises(RecipeError, match="recipe not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(bad)


def test_resolved_yaml_round_trips():
    recipe = parse_recipe(MINIMAL, overrides=["lora.r=8"])
    assert parse_recipe(recipe.to_yaml()) == recipe


def test_recipe_reference_is_up_to_date():
    current = (ROOT / "docs" / "recipe-reference.md").read_text(encoding="utf-8")
    assert current == recipe_reference(), "docs/recipe-reference.md is stale: run `make docs`"


def test_json_schema_forbids_unknown_keys():
    schema = recipe_json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["LoraSection"]["additionalProperties"] is False
    assert set(schema["required"]) == {"model", "data"}
