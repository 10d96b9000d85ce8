"""`vlmtune eval` and the optional eval stage: generation scores before (base) vs after (adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, DEMO, IMAGE, fake_run, train_overfit_run

from vlmtune import scoring
from vlmtune.after import evaluate as ev
from vlmtune.data import prompts
from vlmtune.scoring import METRICS, contains_answer, exact_match

from test_cli import vlmtune


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished QLoRA run on tiny:qwen2_vl that answers PROMPT about IMAGE with ANSWER (trained once)."""
    return train_overfit_run(tmp_path_factory)


REPORT_KEYS = {"exact_match", "contains", "base", "n", "predictions"}
PREDICTION_KEYS = {"index", "prompt", "reference", "base", "adapter"}

# --- scoring --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference", "exact", "contains"),
    [
        ("The circle is yellow.", "The circle is yellow.", True, True),
        ("  the CIRCLE   is yellow ", "The circle is yellow.", True, True),
        ("The circle is yellow!!", "The circle is yellow.", True, True),
        ("I think the circle is yellow, yes.", "The circle is yellow.", False, True),
        ("The circle is blue.", "The circle is yellow.", False, False),
        ("", "The circle is yellow.", False, False),
        ("anything", "", False, False),
    ],
)
def test_scores_ignore_case_whitespace_and_trailing_punctuation(prediction, reference, exact, contains):
    assert exact_match(prediction, reference) is exact
    assert contains_answer(prediction, reference) is contains


def test_scores_are_fractions_of_the_samples():
    assert scoring.scores(["a.", "b", "xc"], ["A", "c", "c"]) == {"exact_match": 1 / 3, "contains": 2 / 3}


def test_the_reference_is_the_last_assistant_turn_and_the_prompt_what_comes_before():
    from vlmtune.data.preflight import read_split
    from vlmtune.recipe import DataSection

    split = read_split(str(DEMO / "eval.jsonl"), DataSection(train="x"))
    multi = next(s for s in split.samples if sum(m["role"] == "assistant" for m in s.messages) == 2)
    item = prompts.eval_item(multi)
    assert item.reference == "The red one."
    assert [m["role"] for m in item.messages] == ["user", "assistant", "user"]
    assert len(item.images) == 2, "the images shown before the answer go with the prompt"
    assert prompts.prompt_text(item.messages).startswith("user: <image> <image> What colors")


# --- after training -------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_data_is_read_with_the_runs_layout_settings(tmp_path: Path):
    """A columns-layout file (image, question, answer) becomes prompt + reference, like training reads it."""
    from vlmtune.recipe import DataSection

    shutil.copy(IMAGE, tmp_path / "a.png")
    row = {"picture": "a.png", "q": "What color is the shape?", "a": "Yellow."}
    (tmp_path / "vqa.jsonl").write_text(json.dumps(row) + "\n")
    settings = DataSection(
        train=str(tmp_path / "vqa.jsonl"),
        format="columns",
        columns={"image": "picture", "question": "q", "answer": "a"},
    )
    items, read = ev.load_items(str(tmp_path / "vqa.jsonl"), settings, None)
    assert read["samples_total"] == 1 and len(items) == 1
    assert items[0].reference == "Yellow."
    assert items[0].messages[0]["content"][-1] == {"type": "text", "text": "What color is the shape?"}
    assert len(items[0].images) == 1


def test_eval_generate_runs_as_a_fourth_stage_after_training(overfit_run: Path):
    summary = json.loads((overfit_run / "summary.json").read_text())
    assert list(summary["stages"]) == ["load", "lora", "train", "eval"]
    stage = summary["stages"]["eval"]
    assert stage["status"] == "done" and stage["n"] == 2
    assert stage["exact_match"] == 0.5, "the trained sample is right, the unseen one is not"
    assert stage["base_exact_match"] == 0.0
    report = json.loads((overfit_run / "4-eval/eval_report.json").read_text())
    assert set(report) >= REPORT_KEYS and report["exact_match"] == 0.5


@pytest.fixture
def run_copy(overfit_run: Path, tmp_path: Path) -> Path:
    """A copy, so rewriting 4-eval/ does not disturb the other tests."""
    shutil.copytree(overfit_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_eval_scores_base_vs_adapter_and_writes_the_report(run_copy: Path, monkeypatch):
    """In-process, to count model loads: the base is loaded once and the adapter toggled."""
    from typer.testing import CliRunner

    from vlmtune.cli import app
    from vlmtune.stages import load

    loads = []
    real_load = load.load
    monkeypatch.setattr(load, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    (run_copy / "4-eval").rename(run_copy / "4-eval-from-training")
    result = CliRunner().invoke(app, ["eval", str(run_copy)])
    assert result.exit_code == 0, result.output
    assert len(loads) == 1, "one base load; the adapter is disabled for the 'before' answers"

    report = json.loads((run_copy / "4-eval/eval_report.json").read_text())
    assert set(report) >= REPORT_KEYS and set(report["base"]) == set(METRICS)  # the run's train.metrics: all
    assert report["n"] == 2 and len(report["predictions"]) == 2
    assert report["exact_match"] == 0.5 and report["contains"] == 0.5
    assert report["base"]["exact_match"] == 0.0 and report["base"]["contains"] == 0.0
    first = report["predictions"][0]
    assert set(first) >= PREDICTION_KEYS
    assert first["index"] == 0 and first["reference"] == ANSWER and first["adapter"] == ANSWER
    assert first["adapter_scores"] == {
        "exact_match": 1.0, "contains": 1.0, "anls": 1.0, "cer": 0.0, "wer": 0.0, "rouge_l": 1.0
    }  # fmt: skip
    page = (run_copy / "4-eval/report.html").read_text()
    assert page.count("<img ") == 2 and page.count('class="card ') == 2 and "http" not in page
    assert first["prompt"] == "user: <image> What color is the shape?"
    assert "exact match" in result.output and "after (trained)" in result.output


@pytest.mark.slow
def test_eval_on_another_file_with_max_samples(run_copy: Path, tmp_path: Path):
    line = json.loads((DEMO / "train.jsonl").read_text().splitlines()[0])
    line["messages"][0]["content"][0]["image"] = str(IMAGE)  # absolute: the file lives elsewhere
    data = tmp_path / "held_out.jsonl"
    data.write_text((json.dumps(line) + "\n") * 3)
    training_report = (run_copy / "4-eval/eval_report.json").read_bytes()
    result = vlmtune("eval", str(run_copy), "--data", str(data), "--max-samples", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_copy / "4-eval/eval_report.json").read_bytes() == training_report, "never overwritten"
    report = json.loads((run_copy / "4-eval/eval_report-held_out.json").read_text())
    assert "eval_report-held_out.json" in result.stdout, "it says where the report went"
    assert report["n"] == 1 and report["exact_match"] == 1.0 and report["contains"] == 1.0
    assert report["base"]["exact_match"] == 0.0
    assert report["data"]["source"].endswith("held_out.jsonl")
    again = vlmtune("eval", str(run_copy), "--data", str(data), "--max-samples", "1")
    assert again.returncode == 0 and (run_copy / "4-eval/eval_report-held_out-2.json").is_file()
    assert json.loads((run_copy / "4-eval/eval_report-held_out.json").read_text()) == report


# --- user errors ------------------------------------------------------------------------------------


def test_eval_without_an_eval_split_asks_for_data(tmp_path: Path):
    run = fake_run(tmp_path / "run", data_eval=None)
    result = vlmtune("eval", str(run))
    assert result.returncode == 2 and "no eval split" in result.stderr and "--data" in result.stderr


def test_eval_with_a_missing_data_file_is_a_clear_error(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    result = vlmtune("eval", str(run), "--data", str(tmp_path / "missing.jsonl"))
    assert result.returncode == 2 and "missing.jsonl" in result.stderr and "hint:" in result.stderr


def test_the_issue_trackers_eval_max_samples_points_at_train_eval_max_samples(tmp_path: Path):
    """One name per knob: an `eval:` section (there is none; data.eval is the split) is refused, and the
    message names the keys it meant, not data.eval."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model:\n  name: tiny:qwen2_vl\ndata:\n  train: t.jsonl\neval:\n  max_samples: 50\n  max_new_tokens: 8\n"
    )
    result = vlmtune("validate", str(recipe))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        "eval (line 5): unknown key; did you mean `train.eval_max_samples`, `train.eval_max_new_tokens`?"
        in (result.stderr)
    )
    recipe.write_text("model:\n  name: tiny:qwen2_vl\ndata:\n  train: t.jsonl\neval: held_out.jsonl\n")
    assert "did you mean `data.eval`?" in vlmtune("validate", str(recipe)).stderr, (
        "a path still means data.eval"
    )


def test_eval_refuses_an_unfinished_or_missing_run(tmp_path: Path):
    result = vlmtune("eval", str(fake_run(tmp_path / "run", status="failed")))
    assert (
        result.returncode == 2 and "did not finish training" in result.stderr and "--resume" in result.stderr
    )
    result = vlmtune("eval", str(tmp_path / "nope"))
    assert result.returncode == 2 and "does not exist" in result.stderr


# --- the HTML report ------------------------------------------------------------------------------


def test_the_html_report_holds_every_sample_and_every_image_mistakes_first(tmp_path: Path):
    """Built from the demo eval split (one sample shows two images) with made-up answers, no model."""
    import base64
    import re

    from vlmtune.after import report_html
    from vlmtune.data.preflight import read_split
    from vlmtune.recipe import DataSection
    from vlmtune.runs.rundir import RunDir

    split = read_split(str(DEMO / "eval.jsonl"), DataSection(train="x"))
    items = [ev.eval_item(s) for s in split.samples]
    answers = [item.reference if n % 2 else "<b>wrong</b> & 错" for n, item in enumerate(items)]
    found = {"adapter": {"answers": answers}, "base": {"answers": [""] * len(items)}}
    content = ev.report(items, found)
    path = report_html.write(RunDir(tmp_path), items, content)
    page = path.read_text(encoding="utf-8")

    cards = re.findall(r'id="sample-(\d+)"', page)
    assert sorted(map(int, cards)) == sorted(item.index for item in items), "every sample, once"
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == sum(len(item.images) for item in items) and len(images) > len(items)
    assert all(base64.b64decode(data).startswith(b"\x89PNG") for data in images), "embedded PNGs"
    assert "http://" not in page and "https://" not in page, "self-contained"
    misses = [item.index for n, item in enumerate(items) if n % 2 == 0]
    assert [int(c) for c in cards[: len(misses)]] == misses, "the wrong answers come first"
    assert "&lt;b&gt;wrong&lt;/b&gt; &amp; 错" in page and "<b>wrong" not in page, "answers are escaped"
    assert 'class="card hit"' in page and 'class="card miss"' in page
