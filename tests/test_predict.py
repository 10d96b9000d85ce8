"""`vlmtune predict`: the base as trained plus the run's adapter answers; bad input is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
from posttrain_fixtures import ANSWER, IMAGE, OTHER_IMAGE, PROMPT, fake_run, train_overfit_run

from test_cli import vlmtune


@pytest.fixture(scope="session")
def overfit_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished QLoRA run on tiny:qwen2_vl that answers PROMPT about IMAGE with ANSWER (trained once)."""
    return train_overfit_run(tmp_path_factory)


@pytest.mark.slow
def test_predict_returns_the_answer_the_run_was_trained_on(overfit_run: Path):
    result = vlmtune("predict", str(overfit_run), "--image", str(IMAGE), "--prompt", PROMPT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == ANSWER, "only the answer goes to stdout"


@pytest.mark.slow
def test_base_only_answers_without_the_adapter(overfit_run: Path):
    result = vlmtune(
        "predict", str(overfit_run), "--image", str(IMAGE), "--prompt", PROMPT, "--base-only",
        "--max-new-tokens", "8",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() != ANSWER, "the random tiny base cannot know the answer"


@pytest.fixture(scope="module")
def inference(overfit_run: Path):
    from vlmtune.after.trained import load_for_inference, open_trained_run

    return load_for_inference(open_trained_run(overfit_run))


@pytest.mark.slow
def test_the_base_is_loaded_as_trained_with_the_adapter_on_top(inference):
    from vlmtune.model.modelinfo import is_quantized_linear as is_quantized

    assert inference.has_adapter and type(inference.model).__name__.startswith("Peft")
    quantized = [n for n, m in inference.model.named_modules() if is_quantized(m)]
    assert quantized and all(".language_model." in n for n in quantized), "NF4 language model, as in training"
    assert not inference.model.training


@pytest.mark.slow
def test_several_images_or_none_are_fine(inference):
    from vlmtune.after.generate import generate_answer, open_images, user_turn

    images = open_images([IMAGE, OTHER_IMAGE])
    two = generate_answer(inference.model, inference.processor, user_turn("Which is first?", 2), images, 8)
    text_only = generate_answer(inference.model, inference.processor, user_turn("Hello", 0), [], 8)
    assert isinstance(two, str) and isinstance(text_only, str)
    one = generate_answer(inference.model, inference.processor, user_turn(PROMPT, 1), images[:1], 16)
    assert one == ANSWER, "in-process generation agrees with the CLI"


def test_help_shows_an_example():
    result = vlmtune("predict", "--help")
    assert result.returncode == 0 and "--base-only" in result.stdout and "Examples" in result.stdout


# --- user errors: a message, a hint, exit 2, before any model is loaded -------------------------


def test_a_missing_run_folder_is_a_clear_error(tmp_path: Path):
    result = vlmtune("predict", str(tmp_path / "nope"), "--image", str(IMAGE), "--prompt", PROMPT)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path: Path):
    result = vlmtune("predict", str(tmp_path), "--image", str(IMAGE), "--prompt", PROMPT)
    assert result.returncode == 2 and "not a vlmtune run folder" in result.stderr and "hint:" in result.stderr


def test_a_run_that_never_finished_is_refused(tmp_path: Path):
    run = fake_run(tmp_path / "run", status="interrupted")
    result = vlmtune("predict", str(run), "--image", str(IMAGE), "--prompt", PROMPT)
    assert result.returncode == 2
    assert "did not finish training" in result.stderr and "interrupted" in result.stderr
    assert f"vlmtune train --resume {run}" in result.stderr


def test_an_image_that_does_not_open_is_a_clear_error(tmp_path: Path):
    run = fake_run(tmp_path / "run")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = vlmtune("predict", str(run), "--image", str(broken), "--prompt", PROMPT)
    assert result.returncode == 2
    assert "cannot open image" in result.stderr and str(broken) in result.stderr and "hint:" in result.stderr

    result = vlmtune("predict", str(run), "--image", str(tmp_path / "missing.png"), "--prompt", PROMPT)
    assert result.returncode == 2 and "image not found" in result.stderr and "hint:" in result.stderr


def test_a_failed_eval_stage_does_not_hide_finished_training():
    from vlmtune.after.trained import training_finished

    stages = {"load": {"status": "done"}, "lora": {"status": "done"}}
    assert training_finished({"status": "done", "stages": {**stages, "train": {"status": "done"}}})
    assert training_finished(
        {"status": "failed", "stages": {**stages, "train": {"status": "done"}, "eval": {"status": "failed"}}}
    ), "the adapter was saved before eval started"
    assert not training_finished({"status": "failed", "stages": {**stages, "train": {"status": "failed"}}})
    assert not training_finished({"status": "running", "stages": {**stages, "train": {"status": "running"}}})
