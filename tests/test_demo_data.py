"""The bundled demo dataset is exactly what scripts/make_demo_data.py writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import ROOT

DEMO = ROOT / "data" / "demo"


def test_the_script_reproduces_the_committed_dataset(tmp_path: Path):
    import numpy as np
    from PIL import Image

    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_demo_data.py"), str(tmp_path)], check=True)
    for name in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / name).read_text() == (DEMO / name).read_text()
    committed = sorted(p.name for p in (DEMO / "images").iterdir())
    assert committed == sorted(p.name for p in (tmp_path / "images").iterdir())
    for name in committed:  # pixels, not bytes: PNG compression may differ between Pillow releases
        a = np.asarray(Image.open(DEMO / "images" / name))
        b = np.asarray(Image.open(tmp_path / "images" / name))
        assert a.shape == b.shape and (a == b).all(), name


def test_answers_depend_on_the_image():
    import json

    rows = [json.loads(line) for line in (DEMO / "train.jsonl").read_text().splitlines()]
    questions = {r["messages"][0]["content"][-1]["text"] for r in rows}
    answers = {r["messages"][1]["content"][0]["text"] for r in rows}
    assert len(rows) == 48 and len(questions) == 3 and len(answers) > 12
