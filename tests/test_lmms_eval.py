"""lmms-eval scores a vlmtune run folder as a model of its own, on a local task (images and YAML written here).

lmms-eval is optional (`make install-lmms`: lmms-eval without its model zoo's dependencies, about 15 s);
without it these tests skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, IMAGE, OTHER_IMAGE, PROMPT, train_overfit_run

pytest.importorskip(
    "lmms_eval", reason="lmms-eval is optional: `make install-lmms` installs it (about 15 s, no torchvision)"
)

from PIL import Image  # noqa: E402

from vlmtune.after import lmms_eval_model  # noqa: E402
from vlmtune.after.lmms_eval_model import (  # noqa: E402
    VlmtuneRun,
    cut_at_stop,
    doc_images,
    manifest,
    request_images,
)
from vlmtune.errors import DataError, RunDirError, VlmtuneError  # noqa: E402

from conftest import ROOT  # noqa: E402

TASK = "vlmtune_local_colours"

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_visual: !function vlmtune.after.lmms_eval_model.doc_images
doc_to_text: question
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""


def local_task(folder: Path) -> Path:
    """Two docs: the image and answer the run was trained on, and an image it never saw (another answer)."""
    images = folder / "images"
    images.mkdir(parents=True)
    docs = []
    for source, answer in ((IMAGE, ANSWER), (OTHER_IMAGE, "The square is red.")):
        shutil.copy(source, images / source.name)
        docs.append({"image": str(images / source.name), "question": PROMPT, "answer": answer})
    data = folder / "colours.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, cache=folder / "hf-cache"))
    return tasks


# --- the pieces, without a model ------------------------------------------------------------------


def test_the_entry_point_hands_lmms_eval_the_run_model():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["entry-points"]["lmms_eval.models"] == {
        "vlmtune": "vlmtune.after.lmms_eval_model:manifest"
    }
    entry = manifest()
    assert (
        entry.model_id == "vlmtune" and entry.simple_class_path == "vlmtune.after.lmms_eval_model.VlmtuneRun"
    )


def test_stop_strings_cut_the_answer_at_the_first_one():
    assert cut_at_stop("Yellow.\nQuestion: next", ["\nQuestion:", "."]) == "Yellow"
    assert cut_at_stop("Yellow. Red.", "Red") == "Yellow. "
    assert cut_at_stop("Yellow", None) == cut_at_stop("Yellow", []) == cut_at_stop("Yellow", [""]) == "Yellow"


def test_visuals_become_rgb_images_and_video_is_refused(tmp_path: Path):
    grey = Image.new("L", (8, 8))
    images = request_images([[grey], str(IMAGE), None])
    assert [im.mode for im in images] == ["RGB", "RGB"] and images[1].size == Image.open(IMAGE).size
    assert request_images(None) == []
    assert doc_images({"image": grey, "question": "q"})[0].mode == "RGB"
    with pytest.raises(DataError, match="takes images only; this task gave str 'clip.mp4'") as raised:
        request_images(["clip.mp4"])
    assert "pick an image task" in raised.value.hint
    with pytest.raises(DataError, match="has no image or images column .it has question.") as raised:
        doc_images({"question": "q"})
    assert "`image`" in raised.value.hint


def test_bad_model_args_and_runs_are_refused_before_any_model_loads(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(lmms_eval_model, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(VlmtuneError, match="unknown argument pretrained") as raised:
        VlmtuneRun(run=str(tmp_path), pretrained="x")
    assert "run=RUN_DIR" in raised.value.hint
    with pytest.raises(VlmtuneError, match="run= is missing"):
        VlmtuneRun()
    with pytest.raises(RunDirError, match="does not exist"):
        VlmtuneRun(run=str(tmp_path / "nothing"))


# --- end to end: lmms-eval's evaluator, the registered model, a trained run ----------------------


@pytest.fixture(scope="module")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_overfit_run(tmp_path_factory)


ENTRY_POINT = "[lmms_eval.models]\nvlmtune = vlmtune.after.lmms_eval_model:manifest\n"


def registered(folder: Path) -> dict[str, str]:
    """The environment of a process that sees the entry point pyproject.toml declares, as an install of
    vlmtune provides it (the editable install here may predate it): a dist-info folder on its path."""
    import os

    info = folder / "vlmtune_lmms_entry-0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmtune-lmms-entry\nVersion: 0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINT)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(folder)])}


@pytest.mark.slow
def test_lmms_eval_scores_a_local_task_with_the_trained_run(overfit_run: Path, tmp_path: Path):
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "lmms_eval", "--model", "vlmtune", "--model_args", f"run={overfit_run}",
        "--tasks", TASK, "--include_path", str(local_task(tmp_path)), "--batch_size", "1",
        "--log_samples", "--output_path", str(tmp_path / "out"),
    ]  # fmt: skip
    done = subprocess.run(
        command, capture_output=True, text=True, env=registered(tmp_path / "ep"), timeout=600
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "vlmtune: scoring the final weights of run" in done.stderr
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())
    assert results["results"][TASK]["exact_match,none"] == 0.5
    lines = next((tmp_path / "out").rglob(f"*_samples_{TASK}.jsonl")).read_text().splitlines()
    samples = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    assert samples[0]["filtered_resps"] == ANSWER, "the trained image's answer, as vlmtune predict gives it"
    assert samples[1]["filtered_resps"] != "The square is red.", "an image it never saw: the metric can fail"
    assert [s["exact_match"] for s in samples] == [1.0, 0.0]
