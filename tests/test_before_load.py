"""What `validate` (and `train`, before its heavy imports) finds without a model: data files, folders,
splits and a --run-dir, with a did-you-mean; short keys get one too; eval_split falls back to test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import ROOT
from test_cli import vlmtune

FORMATS = ROOT / "tests" / "data" / "formats"


def importtime_vlmtune(*args: str) -> subprocess.CompletedProcess:
    """`vlmtune ARGS` under `python -X importtime`: stderr lists every module imported."""
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "vlmtune", *args], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=600)  # fmt: skip


def imported(stderr: str) -> set[str]:
    return {line.split("|")[-1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


def recipe(folder: Path, **data) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "tiny:qwen2_vl"}, "data": data}), encoding="utf-8")
    return path


def test_validate_names_every_missing_file_folder_and_split_with_a_did_you_mean(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text("")
    disk = tmp_path / "disk"
    shutil.copytree(FORMATS / "disk", disk)
    path = recipe(tmp_path, train="trian.jsonl", eval="disk", eval_split="validaton", image_root="pics")
    (tmp_path / "run").mkdir()
    result = vlmtune("validate", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2, result.stdout
    err = result.stderr
    assert "4 problems found before loading anything" in err
    assert (
        f"data.train: data file not found: {tmp_path / 'trian.jsonl'}; did you mean {tmp_path / 'train.jsonl'}?"
        in err
    )
    assert (
        "data.eval_split: " in err
        and "has no split 'validaton'; it has train, validation; did you mean `validation`?" in err
    )
    assert "data.image_root: folder not found: pics" in err
    assert "--run-dir: " in err and "already exists" in err and "hint:" in err


def test_train_refuses_a_missing_data_file_before_importing_torch(tmp_path: Path):
    path = recipe(tmp_path, train="nothere.jsonl")
    result = importtime_vlmtune("train", str(path))
    assert result.returncode == 2 and "data file not found" in result.stderr
    modules = imported(result.stderr)
    assert "vlmtune.data.locate" in modules, "the import log was read"
    assert not {"torch", "transformers"} & modules, "the refusal came after the heavy imports"


def test_train_refuses_an_existing_run_dir_before_importing_torch(tmp_path: Path):
    shutil.copy(ROOT / "data" / "demo" / "train.jsonl", tmp_path / "train.jsonl")
    (tmp_path / "run").mkdir()
    result = importtime_vlmtune(
        "train", str(recipe(tmp_path, train="train.jsonl")), "--run-dir", str(tmp_path / "run")
    )
    assert result.returncode == 2 and "already exists" in result.stderr
    modules = imported(result.stderr)
    assert "vlmtune.data.locate" in modules and "torch" not in modules


def test_a_valid_recipe_with_a_save_to_disk_folder_passes(tmp_path: Path):
    shutil.copytree(FORMATS / "disk", tmp_path / "disk")
    result = vlmtune("validate", str(recipe(tmp_path, train="disk", eval="disk")))
    assert result.returncode == 0, result.stderr


def test_short_keys_get_a_did_you_mean(tmp_path: Path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name: tiny:qwen2_vl}\nlora: {rnak: 8, rr: 4}\ndata: {train: x.jsonl}\n")
    result = vlmtune("validate", str(path))
    assert result.returncode == 2
    assert "lora.rnak (line 2): unknown key; did you mean `lora.r`?" in result.stderr
    assert "lora.rr (line 2): unknown key; did you mean `lora.r`?" in result.stderr


def test_eval_split_falls_back_to_test_when_a_set_has_no_validation(tmp_path: Path):
    from vlmtune.data import open_records
    from vlmtune.recipe import DataSection

    disk = tmp_path / "disk"
    shutil.copytree(FORMATS / "disk", disk)
    (disk / "validation").rename(disk / "test")
    (disk / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    split = DataSection(train="x").eval_split
    assert split == "validation"
    assert open_records(str(disk), split).total == 1, "the test split was read"
    result = vlmtune("validate", str(recipe(tmp_path, train=str(disk), eval=str(disk))))
    assert result.returncode == 0, result.stderr


def test_a_hub_dataset_without_validation_is_read_from_test(monkeypatch):
    import datasets

    from vlmtune.data import open_records

    calls = []

    def fake_load_dataset(name, subset, split):
        calls.append(split)
        if split != "test":
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")
        return datasets.load_from_disk(str(FORMATS / "disk"))["validation"]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert open_records("someone/vqa-set", "validation").total == 1 and calls == ["validation", "test"]
