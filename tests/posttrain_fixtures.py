"""One run trained to overfit one sample, shared by test_predict, test_eval and test_export.

Each of those modules declares an ``overfit_run`` fixture that calls ``train_overfit_run``; the run
is cached here, so it is trained once per test session whichever modules run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import PIXEL_BUDGET, ROOT, write_recipe
from test_cli import vlmtune

DEMO = ROOT / "data" / "demo"
IMAGE = DEMO / "images" / "000.png"
PROMPT = "What color is the shape?"
ANSWER = "The circle is yellow."  # the answer of train.jsonl line 1, about images/000.png
OTHER_IMAGE = DEMO / "images" / "002.png"  # line 3: "The square is red." (never trained on)

_RUNS: dict[str, Path] = {}


def overfit_folder(folder: Path, copies: int = 8) -> Path:
    """train.jsonl: one sample repeated; eval.jsonl: that sample plus one the run never saw."""
    shutil.copytree(DEMO / "images", folder / "images")
    lines = (DEMO / "train.jsonl").read_text().splitlines()
    assert ANSWER in lines[0] and "images/000.png" in lines[0]
    (folder / "train.jsonl").write_text((lines[0] + "\n") * copies)
    (folder / "eval.jsonl").write_text(lines[0] + "\n" + lines[2] + "\n")
    return folder


def overfit_recipe(folder: Path, **train) -> Path:
    overfit_folder(folder)
    return write_recipe(
        folder,
        model={"name": "tiny:qwen2_vl"},
        quantization={"bits": 4},
        data={"train": "train.jsonl", "eval": "eval.jsonl", "max_image_pixels": PIXEL_BUDGET},
        train={"max_steps": 60, "batch_size": 4, "grad_accum": 1, "lr": 5e-3, "lr_scheduler": "constant",
               "max_length": 256, "gradient_checkpointing": False, "save_steps": 1000, "eval_generate": True,
               **train},
    )  # fmt: skip


def train_overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Train once per session: 60 NF4 steps on one sample (loss ~6.8 -> ~0.01, about 10-60 s)."""
    if "overfit" not in _RUNS:
        folder = tmp_path_factory.mktemp("overfit")
        result = vlmtune("train", str(overfit_recipe(folder)), "--run-dir", str(folder / "run"))
        assert result.returncode == 0, result.stderr[-3000:]
        _RUNS["overfit"] = folder / "run"
    return _RUNS["overfit"]


def fake_run(folder: Path, status: str = "done", data_eval: str | None = "eval.jsonl") -> Path:
    """A run folder with a summary, a resolved recipe and an (empty) adapter folder, never trained:
    enough for the checks that must fail before any model is loaded."""
    import json

    import yaml

    folder.mkdir(parents=True)
    stages = {"load": "done", "lora": "done", "train": "done" if status == "done" else "interrupted"}
    summary = {"recipe": "fake", "status": status, "stages": {k: {"status": v} for k, v in stages.items()}}
    (folder / "summary.json").write_text(json.dumps(summary))
    recipe = {"model": {"name": "tiny:qwen2_vl"}, "data": {"train": "train.jsonl", "eval": data_eval}}
    (folder / "resolved.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "3-train" / "adapter").mkdir(parents=True)
    return folder
