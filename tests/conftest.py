"""Shared fixtures: offline everywhere, tiny models cached inside the repo's .cache/."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLMTUNE_CACHE", str(ROOT / ".cache" / "vlmtune"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_path():
    """tiny_path(family) -> the cached tiny checkpoint folder (built once per machine)."""
    from vlmtune.tiny import tiny_model_path

    return tiny_model_path


@pytest.fixture(scope="session")
def demo_train() -> Path:
    return ROOT / "data" / "demo" / "train.jsonl"


def write_recipe(folder: Path, **sections) -> Path:
    """A recipe file in ``folder`` from section dicts (model and data are required)."""
    import yaml

    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(sections, sort_keys=False), encoding="utf-8")
    return path
