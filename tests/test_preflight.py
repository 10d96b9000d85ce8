"""Pre-flight: one sample at a time, a report that counts everything, `vlmtune data check` exit codes."""

from __future__ import annotations

import gc
import io
import json
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import spawn

from vlmtune.data import preflight
from vlmtune.data.preflight import scan_split
from vlmtune.errors import DataError, ModelError
from vlmtune.recipe import DataSection, load_recipe

from conftest import PIXEL_BUDGET, ROOT, write_recipe

FORMATS = ROOT / "tests" / "data" / "formats"
BAD = ROOT / "tests" / "data" / "bad" / "train.jsonl"
FORMAT_RECIPES = sorted((ROOT / "recipes" / "formats").glob("*.yaml"))


@pytest.fixture(scope="module")
def collator(tiny_path):
    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.families import get_family
    from vlmtune.model.processing import load_processor

    family = get_family("qwen2_vl")
    processor = load_processor(tiny_path("qwen2_vl"), family, PIXEL_BUDGET)
    return VisionCollator(processor, family, max_length=None, train_on_responses_only=True)


def section(path: Path, **keys) -> DataSection:
    return DataSection(train=str(path), **{"on_bad_sample": "skip", "too_long": "drop", **keys})


# --- memory: decode, check, release -------------------------------------------------------------


def write_large_set(folder: Path, samples: int) -> Path:
    from PIL import Image

    (folder / "images").mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (256, 256), color).save(folder / "images" / f"{i}.png")
    with (folder / "train.jsonl").open("w") as f:
        for i in range(samples):
            images = [{"type": "image", "image": f"images/{(i + k) % 3}.png"} for k in range(1 + i % 2)]
            user = {"role": "user", "content": [*images, {"type": "text", "text": f"Question {i}?"}]}
            f.write(json.dumps({"messages": [user, {"role": "assistant", "content": f"Answer {i}."}]}) + "\n")
    return folder / "train.jsonl"


def test_a_large_set_is_checked_without_holding_its_images(tmp_path: Path, monkeypatch):
    path = write_large_set(tmp_path, 2000)
    live: list[weakref.ref] = []
    peak = 0
    opened = 0
    real_open = preflight.open_image

    def tracked_open(source, **kwargs):
        nonlocal peak, opened
        image = real_open(source, **kwargs)
        opened += 1
        live[:] = [ref for ref in live if ref() is not None]
        live.append(weakref.ref(image))
        peak = max(peak, len(live))
        return image

    def measure(sample) -> int:
        assert all(hasattr(image, "mode") for image in sample.images), "measure sees decoded images"
        return 10 + 64 * sample.n_images

    monkeypatch.setattr(preflight, "open_image", tracked_open)
    report = scan_split("train", str(path), section(path), 512, measure)
    gc.collect()

    assert report.total == len(report.samples) == 2000 and opened == 3000, "each image decoded exactly once"
    assert peak <= 2, f"at most one sample's images are decoded at a time, saw {peak}"
    assert not [ref for ref in live if ref() is not None], "no decoded image outlives the check"
    assert all(isinstance(source, str) for s in report.samples for source in s.images), (
        "kept samples stay lazy"
    )
    assert report.to_json()["images_total"] == 3000


# --- the report ---------------------------------------------------------------------------------


def test_the_report_counts_layouts_lengths_images_and_the_pixel_budget(collator):
    path = FORMATS / "messages.jsonl"
    report = scan_split("train", str(path), section(path, max_image_pixels=2000), 512, collator.count_tokens)
    summary = json.loads(json.dumps(report.to_json()))
    assert summary["samples_total"] == summary["samples_kept"] == 3
    assert summary["formats"] == {"messages": 3}
    assert summary["images_total"] == 3 and summary["text_only_samples"] == 1
    assert summary["images_per_sample"]["max"] == 2 and summary["images_per_sample"]["min"] == 0
    # red.png is 48x40 = 1920 pixels (twice), blue.png 40x56 = 2240: only blue is over 2000.
    assert summary["max_image_pixels"] == 2000 and summary["images_over_pixel_budget"] == 1
    assert set(summary["tokens"]) == {"min", "p50", "p90", "p99", "max", "mean"}
    assert summary["tokens"]["max"] == max(report.lengths) and summary["max_length"] == 512
    assert report.lengths == [collator.count_tokens(s) for s in report.samples], "lengths are the processor's"


def test_problems_are_listed_in_sample_order(collator):
    report = scan_split(
        "train", str(BAD), section(BAD, max_image_pixels=PIXEL_BUDGET), 200, collator.count_tokens
    )
    indices = [p.index for p in report.problems]
    assert indices == sorted(indices) and 15 in indices


def test_a_processor_refusal_is_a_sample_problem_but_a_model_error_stops_the_check(tmp_path: Path):
    path = FORMATS / "trl.jsonl"

    def refuses(sample):
        raise ValueError("no thanks")

    report = scan_split("train", str(path), section(path), 512, refuses)
    assert [(p.field, p.reason) for p in report.skipped][0] == (
        "processor",
        "the model's processor refused the sample (no thanks)",
    )

    def broken_model(sample):
        raise ModelError("template mismatch")

    with pytest.raises(ModelError):
        scan_split("train", str(path), section(path), 512, broken_model)


def test_nothing_left_lists_why(tmp_path: Path):
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n[1]\n')
    with pytest.raises(DataError, match=r"no sample is left to train on \(2 read\)\n  - sample 0: messages"):
        preflight.check_split("train", str(tmp_path / "train.jsonl"), section(tmp_path), 64, lambda s: 1)


def test_a_progress_bar_on_a_terminal_and_silence_elsewhere():
    from rich.console import Console

    path = FORMATS / "trl.jsonl"
    terminal = Console(file=io.StringIO(), force_terminal=True, width=100)
    scan_split("train", str(path), section(path), 512, lambda s: 1, console=terminal)
    assert "checking train" in terminal.file.getvalue()
    piped = Console(file=io.StringIO(), force_terminal=False)
    scan_split("train", str(path), section(path), 512, lambda s: 1, console=piped)
    assert piped.file.getvalue() == ""


def test_training_writes_the_report_and_skips_with_reasons(collator, tmp_path: Path):
    from vlmtune.model.families import get_family
    from vlmtune.recipe import TrainSection
    from vlmtune.runs.rundir import RunDir
    from vlmtune.stages.sft import prepare_data

    run = RunDir.create(tmp_path, "run")
    data = section(BAD, eval=str(FORMATS / "messages.jsonl"), max_image_pixels=PIXEL_BUDGET)
    _, train, evaluation = prepare_data(
        collator.processor, get_family("qwen2_vl"), data, TrainSection(max_length=200), run
    )
    assert len(train.samples) == 4 and len(evaluation.samples) == 3
    report = json.loads((run / "3-train/data_report.json").read_text())
    assert report["train"]["samples_kept"] == 4 and len(report["train"]["skipped_invalid"]) == 21
    assert report["train"]["dropped_too_long"][0]["index"] == 15
    assert report["eval"]["formats"] == {"messages": 3}


# --- recipes and the CLI ------------------------------------------------------------------------


@pytest.mark.parametrize("path", FORMAT_RECIPES, ids=lambda p: p.stem)
def test_every_format_recipe_passes_its_data_check(path: Path):
    from vlmtune.data.check import check_recipe_data

    reports = check_recipe_data(load_recipe(path))
    for report in reports.values():
        assert report.problems == [] and report.samples, report.source


def vlmtune(*args: str) -> subprocess.CompletedProcess:
    return spawn.run([sys.executable, "-m", "vlmtune", *args], capture_output=True, text=True, cwd=ROOT)


def test_data_check_cli_exits_zero_with_a_summary_on_good_data():
    result = vlmtune("data", "check", "recipes/formats/sharegpt.yaml")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "6 read, 6 usable" in result.stdout and "6 sharegpt" in result.stdout
    assert "every sample is usable" in result.stdout


def test_data_check_cli_lists_every_problem_and_exits_non_zero(tmp_path: Path):
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(BAD), "max_image_pixels": PIXEL_BUDGET},
        train={"max_length": 200},
    )
    result = vlmtune("data", "check", str(recipe))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "26 read, 4 usable" in result.stdout
    assert "sample 1: messages[0].content[0].image: file not found" in result.stdout
    assert "sample 18: messages[0].content[0].image: path '../../etc/passwd.png' escapes" in result.stdout
    assert "22 problem sample(s)" in result.stderr and "data.on_bad_sample: skip" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_check_cli_names_a_missing_file(tmp_path: Path):
    recipe = write_recipe(tmp_path, model={"name": "tiny:qwen2_vl"}, data={"train": "nowhere.jsonl"})
    result = vlmtune("data", "check", str(recipe))
    assert (
        result.returncode == 2 and "data file not found" in result.stderr and "Traceback" not in result.stderr
    )


def test_data_check_json_has_the_data_report_keys(tmp_path: Path):
    recipe = write_recipe(
        tmp_path,
        model={"name": "tiny:qwen2_vl"},
        data={"train": str(BAD), "max_image_pixels": PIXEL_BUDGET},
        train={"max_length": 200},
    )
    result = vlmtune("data", "check", str(recipe), "--json")
    assert result.returncode == 2
    report = json.loads(result.stdout)["train"]
    assert report["samples_total"] == 26 and report["samples_kept"] == 4
    assert any(p["index"] == 1 and "file not found" in p["reason"] for p in report["skipped_invalid"])
