"""Bad input gets a message, never a hang, a traceback or a silent wrong: recipes, --set values,
run folders and files in them, an empty dataset. Every case through the CLI, asserting the message."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, write_recipe
from test_cli import vlmtune

DEMO = ROOT / "data" / "demo"
MINIMAL = {"model": {"name": "tiny:qwen2_vl"}, "data": {"train": str(DEMO / "train.jsonl")}}


def refused(*args: str) -> str:
    """Run the CLI; it must exit 2 with a message and no traceback. Returns stderr."""
    result = vlmtune(*args)
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "error: " in result.stderr
    return result.stderr


def recipe_text(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [{','.join(['*' + previous] * 9)}]")
    text = (
        "\n".join(lines)
        + f"\nmodel: {{name: tiny:qwen2_vl}}\ndata: {{train: {DEMO}/train.jsonl}}\nlora: *i\n"
    )
    assert len(text) < 700, "a few hundred bytes that expand to 9^9 values"
    stderr = refused("validate", str(recipe_text(tmp_path, text)))  # before the fix: minutes and gigabytes
    assert "expands to more than 100,000 values through its aliases (*name)" in stderr


def test_a_recursive_alias_and_an_oversized_recipe_are_refused(tmp_path: Path):
    stderr = refused("validate", str(recipe_text(tmp_path, "model: &m {name: *m}\n")))
    assert "has an alias that contains itself" in stderr
    big = yaml.safe_dump(MINIMAL) + "# " + "x" * (1 << 20) + "\n"
    stderr = refused("validate", str(recipe_text(tmp_path, big)))
    assert "bytes; a recipe is at most 1,048,576" in stderr


def test_a_recipe_nested_thousands_deep_is_refused(tmp_path: Path):
    stderr = refused("validate", str(recipe_text(tmp_path, "model: " + "[" * 3000 + "]" * 3000 + "\n")))
    assert "nests too deeply to be a recipe" in stderr and "hint: a recipe is a few levels deep" in stderr


def test_resume_with_a_run_dir_is_refused_naming_the_command(tmp_path: Path):
    stderr = refused("train", "--resume", str(tmp_path / "a"), "--run-dir", str(tmp_path / "b"))
    assert "--run-dir names a new run folder; --resume continues an existing one: give one" in stderr
    assert f"hint: vlmtune train --resume {tmp_path / 'a'} (it continues in that folder)" in stderr


def test_a_key_or_a_section_given_twice_names_both_lines(tmp_path: Path):
    text = (
        "model:\n  name: tiny:qwen2_vl\n"  # lines 1-2
        f"data:\n  train: {DEMO}/train.jsonl\n"  # 3-4
        "train:\n  max_steps: 10\n  lr: 1.0e-4\n  lr: 2.0e-4\n"  # 5-8
        "train:\n  batch_size: 4\n"  # 9-10
    )
    stderr = refused("validate", str(recipe_text(tmp_path, text)))
    assert "gives 2 keys twice; YAML would keep only the last" in stderr
    assert "train at line 5 and again at line 9" in stderr
    assert "train.lr at line 7 and again at line 8" in stderr


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "max_steps", 0, "0 steps would train nothing"),
        ("train", "max_steps", -5, "greater than or equal to -1 (got -5)"),
        ("train", "seed", -1, "greater than or equal to 0 (got -1)"),
        ("train", "seed", 2**32, "less than 4294967296"),
        ("train", "lr", float("inf"), "finite number"),
        ("train", "lr", float("nan"), "finite number"),
        ("train", "epochs", float("inf"), "finite number"),
        ("train", "batch_size", True, "expects a number, got true"),
        ("train", "lr", False, "expects a number, got false"),
        ("lora", "r", True, "expects a number, got true"),
        ("train", "save_total_limit", 0, "greater than 0"),
        ("output", "name", "../../elsewhere", "is not a single folder name"),
        ("output", "name", "/abs/run", "is not a single folder name"),
        ("output", "name", "..", "is not a single folder name"),
    ],
)
def test_numbers_and_names_are_validated(tmp_path: Path, section, key, value, message):
    path = write_recipe(tmp_path, **MINIMAL, **{section: {key: value}})
    stderr = refused("validate", str(path))
    assert f"{section}.{key} (line" in stderr and message in stderr


def test_a_plain_run_name_and_minus_one_steps_stay_valid(tmp_path: Path):
    path = write_recipe(tmp_path, **MINIMAL, train={"max_steps": -1, "seed": 0}, output={"name": "my-run_2"})
    result = vlmtune("validate", str(path))
    assert result.returncode == 0, result.stderr


def test_a_recipe_that_is_not_utf8_is_named(tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"model:\n  name: tiny:qwen2_vl\n\xff\xfe\x00garbage\n")
    stderr = refused("validate", str(path))
    assert f"{path} is not UTF-8 text (byte 0xff at offset 29)" in stderr


@pytest.mark.parametrize(
    "override, message",
    [
        ("lora.r=[", "bad override 'lora.r=[': the value is not valid YAML"),
        ("model.name=*x", "found undefined alias 'x'"),
        ("lora.r=!!python/object/apply:os.system [echo]", "could not determine a constructor"),
    ],
)
def test_malformed_override_values_are_messages(tmp_path: Path, override: str, message: str):
    path = write_recipe(tmp_path, **MINIMAL)
    stderr = refused("validate", str(path), "--set", override)
    assert message in stderr and "hint: quote a value" in stderr


def test_a_run_folder_that_cannot_be_created_is_a_message(tmp_path: Path):
    path = write_recipe(tmp_path, **MINIMAL)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    stderr = refused("train", str(path), "--run-dir", str(blocker / "run"))
    assert f"cannot create the run folder: {blocker / 'run'}" in stderr and "Not a directory" in stderr

    if os.geteuid() == 0:  # root writes through file modes; /proc takes no new folders from anyone
        readonly = Path("/proc/vlmtune-readonly")
    else:
        readonly = tmp_path / "readonly"
        readonly.mkdir()
        readonly.chmod(0o555)
    stderr = refused("train", str(path), "--run-dir", str(readonly / "run"))
    assert "cannot create the run folder" in stderr and "choose a writable folder" in stderr


def fake_run(tmp_path: Path, summary: bytes, resolved: bytes) -> Path:
    run = tmp_path / "run"
    (run / "3-train").mkdir(parents=True)
    (run / "summary.json").write_bytes(summary)
    (run / "resolved.yaml").write_bytes(resolved)
    return run


def test_a_damaged_summary_or_resolved_recipe_is_named(tmp_path: Path):
    run = fake_run(tmp_path, b"\x00\x01binary{", yaml.safe_dump(MINIMAL).encode())
    for args in (("train", "--resume", str(run)), ("export", str(run), "--out", str(tmp_path / "out"))):
        stderr = refused(*args)
        assert f"{run / 'summary.json'} is damaged: it is not JSON" in stderr

    interrupted = json.dumps({"status": "interrupted", "stages": {}}).encode()
    run = fake_run(tmp_path / "b", interrupted, b"\x89PNG\r\n\x1a\n\xff\xd8")
    assert f"{run / 'resolved.yaml'} is not UTF-8 text" in refused("train", "--resume", str(run))
    run = fake_run(tmp_path / "c", interrupted, b"model: [unclosed\n")
    assert f"{run / 'resolved.yaml'} is not valid YAML at line 2" in refused("train", "--resume", str(run))


def test_an_empty_dataset_is_nothing_to_train_on(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    path = write_recipe(tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": "empty.jsonl"})
    result = vlmtune("data", "check", str(path))
    assert result.returncode == 2, result.stdout[-2000:]
    assert "nothing to train on: no sample in train" in result.stderr
    assert "every sample is usable" not in result.stdout


@pytest.mark.slow
def test_training_on_an_empty_dataset_is_refused_with_a_message(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    path = write_recipe(tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": "empty.jsonl"})
    stderr = refused("train", str(path), "--run-dir", str(tmp_path / "run"))
    assert "no usable samples: no sample is left to train on (0 read)" in stderr
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert (
        summary["status"] == "failed"
        and "no sample is left to train on" in summary["stages"]["train"]["error"]
    )


def test_a_boolean_for_a_number_of_a_grpo_reward_is_refused_naming_the_key():
    from vlmtune.errors import RecipeError
    from vlmtune.recipe import parse_recipe

    text = (
        "model: {name: tiny:qwen2_vl}\ndata: {train: x.jsonl}\ntrain: {objective: grpo}\n"
        "grpo: {rewards: [{type: number, tolerance: true}]}\n"
    )
    with pytest.raises(RecipeError) as refusal:
        parse_recipe(text)
    assert refusal.value.problems == ["grpo.rewards.0.number: tolerance expects a number, got true"]


# --- YAML 1.1's surprises and lax booleans (issue 23) ------------------------------------------------


@pytest.mark.parametrize(
    "line, message",
    [
        ("train: {lr: 1:30}", "train.lr at line 3: 1:30 is a YAML 1.1 base-60 number (it would read as 90)"),
        ("train: {max_steps: 1:00:00}", "train.max_steps at line 3: 1:00:00 is a YAML 1.1 base-60 number"),
        ("output: {name: !!binary aGVsbG8=}", "output.name at line 3: !!binary data"),
    ],
)
def test_base_60_numbers_and_binary_data_are_refused_with_their_line(tmp_path: Path, line: str, message: str):
    text = f"model: {{name: tiny:qwen2_vl}}\ndata: {{train: {DEMO}/train.jsonl}}\n{line}\n"
    stderr = refused("validate", str(recipe_text(tmp_path, text)))
    assert message in stderr and "hint: quote a value meant as text" in stderr


def test_a_base_60_override_is_refused_and_a_quoted_one_is_text(tmp_path: Path):
    path = write_recipe(tmp_path, **MINIMAL)
    assert "1:30 is a YAML 1.1 base-60 number" in refused("validate", str(path), "--set", "train.lr=1:30")
    stderr = refused("validate", str(path), "--set", "train.lr='1:30'")  # text now: not a number
    assert "train.lr" in stderr and "base-60" not in stderr


GRPO_CODE = {
    "model": {"name": "tiny:qwen2_vl"},
    "data": {"train": str(DEMO / "train.jsonl")},
    "train": {"objective": "grpo"},
    "grpo": {"rewards": [{"type": "function", "function": "my_rewards:score"}]},
}


@pytest.mark.parametrize("value", ["true", "yes", "on", 1, "1"])
@pytest.mark.parametrize(
    "key", ["grpo.allow_code", "data.allow_urls", "data.follow_symlinks", "data.shuffle"]
)
def test_a_boolean_opt_in_takes_only_true_or_false(tmp_path: Path, key: str, value):
    section, name = key.split(".")
    recipe = json.loads(json.dumps(GRPO_CODE))
    recipe[section][name] = value
    stderr = refused("validate", str(write_recipe(tmp_path, **recipe)))
    assert f"{key} (line" in stderr and f"expects true or false, got {value!r}" in stderr
    if key == "grpo.allow_code":
        assert "allow_code is false" not in stderr  # refused as a value, not read as false or true


def test_a_real_boolean_opt_in_stays_valid(tmp_path: Path):
    recipe = json.loads(json.dumps(GRPO_CODE))
    recipe["grpo"]["allow_code"] = True
    recipe["data"].update(allow_urls=True, follow_symlinks=False)
    result = vlmtune("validate", str(write_recipe(tmp_path, **recipe)))
    assert result.returncode == 0, result.stderr
