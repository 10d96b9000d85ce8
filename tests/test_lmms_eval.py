"""lmms-eval scores a vlmtune run folder as a model of its own, on a local task (images and YAML written here).

lmms-eval is optional (`make install-lmms`: lmms-eval without its model zoo's dependencies, about 15 s);
without it these tests skip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from posttrain_fixtures import ANSWER, IMAGE, OTHER_IMAGE, PROMPT, train_overfit_run

pytest.importorskip(
    "lmms_eval.api.model",
    reason="lmms-eval is optional: `make install-lmms` installs it (about 15 s, no torchvision)",
)

from PIL import Image  # noqa: E402

from vlmtune.after import lmms_eval_model  # noqa: E402
from vlmtune.after.lmms_eval_model import (  # noqa: E402
    VlmtuneRun,
    cut_at_stop,
    doc_images,
    manifest,
    request_images,
    sampling_asked,
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


def test_only_sampling_and_beams_count_as_not_greedy():
    assert sampling_asked({"temperature": 0, "do_sample": False, "top_p": 1.0, "num_beams": 1}) == {}
    assert sampling_asked({"temperature": 0.2, "num_beams": 3}) == {"temperature": 0.2, "num_beams": 3}


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


def test_model_args_as_lmms_eval_parses_them_open_the_run_as_predict_does(tmp_path: Path, monkeypatch):
    """lmms-eval turns `checkpoint=40,force=true` into 40 and True: the run opens with "40" and force."""
    from lmms_eval.api.model import lmms

    opened = []
    monkeypatch.setattr(
        lmms_eval_model, "open_trained_run", lambda *a, **k: opened.append((a, k)) or FakeRun()
    )
    monkeypatch.setattr(
        lmms_eval_model, "load_for_inference", lambda trained, device=None: f"model on {device}"
    )
    model = VlmtuneRun.create_from_arg_string(f"run={tmp_path},checkpoint=40,force=true", {"batch_size": 1})
    assert opened == [((str(tmp_path), "40"), {"force": True})]
    assert isinstance(model, lmms) and model.inference == "model on None"
    assert model.which == f"checkpoint checkpoint-40 of run {tmp_path}"


def test_each_request_is_answered_with_its_docs_images_its_limit_and_its_stop_strings(
    tmp_path, monkeypatch, capsys
):
    from lmms_eval.api.instance import Instance

    asked = []

    def answer(model, processor, messages, images, max_new_tokens):
        asked.append((messages, [im.size for im in images], max_new_tokens))
        return "Yellow.\n\nQuestion: and now?"

    monkeypatch.setattr(lmms_eval_model, "open_trained_run", lambda *a, **k: FakeRun())
    loaded = SimpleNamespace(model="model", processor="processor")
    monkeypatch.setattr(lmms_eval_model, "load_for_inference", lambda trained, device=None: loaded)
    monkeypatch.setattr(lmms_eval_model, "generate_answer", answer)
    model = VlmtuneRun(run=str(tmp_path), max_new_tokens=5)
    model.task_dict = {
        "colours": {"test": [{"image": Image.new("RGB", (4, 3))}, {"image": None, "images": []}]}
    }
    requests = [
        Instance("generate_until", (prompt, kwargs, doc_images, doc_id, "colours", "test"), doc_id,
                 {"task": "colours", "doc_id": doc_id, "repeats": 1})
        for doc_id, prompt, kwargs in ((0, "Colour?", {"until": ["\n\n"], "max_new_tokens": 16, "temperature": 0}),
                                       (1, "Text?", {"temperature": 0.7}))
    ]  # fmt: skip
    assert model.generate_until(requests) == ["Yellow.", "Yellow.\n\nQuestion: and now?"]
    (first, first_sizes, first_limit), (second, second_sizes, second_limit) = asked
    assert first[0]["content"] == [
        {"type": "image"},
        {"type": "text", "text": "Colour?"},
    ] and first_sizes == [(4, 3)]
    assert first_limit == 16 and second_limit == 5, "the task's max_new_tokens, else the model's"
    assert second[0]["content"] == [{"type": "text", "text": "Text?"}] and second_sizes == []
    said = capsys.readouterr().err
    assert said.count("answers greedily") == 1 and "{'temperature': 0.7} is not used" in said, "said once"
    with pytest.raises(VlmtuneError, match="generation tasks only"):
        model.loglikelihood(requests)


class FakeRun:
    which = "checkpoint checkpoint-40"


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
