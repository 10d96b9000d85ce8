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
# One torch thread per test process (and per subprocess it starts): on a shared 2-core machine the
# default thread count made training up to 11x slower (FACTS.md); `make test` runs two workers.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# vlmtune.kernels on CPU: triton reads this when its decorators run, so before any kernel module loads.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from vlmtune.data import Sample  # noqa: E402

QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
# data.max_image_pixels in tests: 112x112, so the demo's images become a few dozen tokens and
# tiny models train in seconds.
PIXEL_BUDGET = 12544
RED = ROOT / "data" / "demo" / "images" / "000.png"  # 56x56
BLUE = ROOT / "data" / "demo" / "images" / "001.png"


# --- samples shared by the stage tests ------------------------------------------------------------


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


TWO_TURNS = Sample(  # two images, two answers
    0,
    [user("How many images?", 2), assistant("There are two."), user("Which is first?"), assistant("Red.")],
    [str(RED), str(BLUE)],
)
ONE_IMAGE = Sample(  # a system prompt as a plain string, one image
    1,
    [{"role": "system", "content": "Be brief."}, user("What color is it?", 1), assistant("Yellow.")],
    [str(RED)],
)
TEXT_ONLY = Sample(2, [user("Hello"), assistant("Hi there.")], [])


@pytest.fixture(scope="session")
def tiny_path():
    """tiny_path(family) -> the cached tiny checkpoint folder (built once per machine)."""
    from vlmtune.model.tiny import tiny_model_path

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
