"""Answer metrics during training, the best checkpoint and early stopping, on one short tiny-model run.

A user's metric (opted in with train.allow_metric_code) scores the answers at train.eval_generate_steps
with a scripted series, so the best checkpoint is known in advance and is not the last one: 0.2 at
step 2, 0.9 at step 4 (the best), then 0.5 and 0.4, which uses up a patience of 2 at step 8.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import spawn
from posttrain_fixtures import IMAGE, PROMPT, overfit_recipe

from vlmtune.runs import rundir
from vlmtune.runs.trainer_checkpoints import best, rotate

from test_cli import vlmtune

SCRIPTED = """
VALUES = [0.2, 0.9, 0.5, 0.4, 0.3, 0.2]
calls = []


def scripted(predictions, references):
    assert len(predictions) == len(references) == 1  # train.eval_max_samples
    calls.append(1)
    return VALUES[len(calls) - 1]
"""


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("best")
    (folder / "my_metric.py").write_text(SCRIPTED)
    recipe = overfit_recipe(
        folder, max_steps=20, save_steps=2, save_total_limit=1, eval_generate=True,
        eval_generate_steps=2, eval_max_samples=1, eval_max_new_tokens=4,
        metrics=["exact_match", "rouge_l", "cer"], metric_function="my_metric:scripted", allow_metric_code=True,
        best_metric="scripted", early_stopping_patience=2,
    )  # fmt: skip
    result = vlmtune("train", str(recipe), "--run-dir", str(folder / "run"))
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "run", result


@pytest.mark.slow
def test_answer_metrics_are_logged_at_eval_generate_steps(stopped_run):
    run, _ = stopped_run
    rows = [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]
    answers = [row for row in rows if "eval_scripted" in row]
    assert [row["step"] for row in answers] == [2, 4, 6, 8]
    assert [row["eval_scripted"] for row in answers] == [0.2, 0.9, 0.5, 0.4]
    for row in answers:
        assert row["eval_answers"] == 1
        assert 0 <= row["eval_exact_match"] <= 1 and 0 <= row["eval_rouge_l"] <= 1 and row["eval_cer"] >= 0
        assert "eval_bleu" not in row, "only train.metrics are computed"
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, 9)), "every step's train row too"
    losses = [row["loss"] for row in rows if "loss" in row]
    assert losses[-1] < losses[2] < losses[1], (
        "4-bit training still learns after the evals (no repacked weights)"
    )


@pytest.mark.slow
def test_early_stopping_stops_and_says_why(stopped_run):
    run, result = stopped_run
    train = json.loads((run / rundir.SUMMARY).read_text())["stages"]["train"]
    assert train["steps"] == 8, "patience 2 is used up at the 4th measurement (step 8), not at max_steps 20"
    assert "has not improved for 2 measurements" in train["stopped_early"]
    assert "stopped early at step 8" in result.stderr


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_named_and_used(stopped_run):
    from safetensors.torch import load_file

    from vlmtune.after.trained import load_for_inference, open_trained_run

    run, result = stopped_run
    best_entry = json.loads((run / rundir.SUMMARY).read_text())["stages"]["train"]["best_checkpoint"]
    assert best_entry["path"] == f"{rundir.CHECKPOINTS}/checkpoint-4" and best_entry["value"] == 0.9
    kept = sorted(p.name for p in (run / rundir.CHECKPOINTS).glob("checkpoint-*"))
    assert kept == ["checkpoint-4", "checkpoint-8"], (
        "save_total_limit 1 keeps the newest, and the best beside it"
    )
    assert "best checkpoint: 3-train/checkpoints/checkpoint-4" in result.stderr

    trained = open_trained_run(run)
    assert trained.weights == run / rundir.CHECKPOINTS / "checkpoint-4"
    assert open_trained_run(run, "last").weights == run / rundir.ADAPTER
    assert open_trained_run(run, "checkpoint-8").weights.name == "checkpoint-8"
    # the weights predict loads are the best checkpoint's, not the final ones
    model = load_for_inference(trained).model
    saved = load_file(str(run / rundir.CHECKPOINTS / "checkpoint-4" / rundir.PEFT_WEIGHTS))
    final = load_file(str(run / rundir.ADAPTER / rundir.PEFT_WEIGHTS))
    live = {name: p for name, p in model.named_parameters() if "lora_B" in name}
    name = next(iter(k for k in saved if "lora_B" in k))
    param = next(p for n, p in live.items() if n.replace(".default", "") == name)
    assert param.float().allclose(saved[name].float()) and not param.float().allclose(final[name].float())


@pytest.mark.slow
def test_the_eval_stage_scores_the_best_checkpoint_and_writes_the_html_report(stopped_run):
    run, _ = stopped_run
    summary = json.loads((run / rundir.SUMMARY).read_text())
    assert summary["status"] == "done" and summary["stages"]["eval"]["status"] == "done"
    report = json.loads((run / rundir.EVAL_REPORT).read_text())
    assert set(report) >= {"exact_match", "rouge_l", "cer"} and "bleu" not in report, (
        "the run's train.metrics"
    )
    page = (run / rundir.EVAL_HTML).read_text()
    assert page.count('class="card ') == report["n"] == 2 and page.count("<img ") == 2


@pytest.mark.slow
def test_predict_uses_the_best_checkpoint_and_checkpoint_picks_another(stopped_run):
    run, _ = stopped_run
    used = vlmtune("predict", str(run), "-i", str(IMAGE), "-p", PROMPT, "--max-new-tokens", "4")
    assert used.returncode == 0, used.stderr[-3000:]
    assert "using the best checkpoint checkpoint-4 (eval_scripted 0.9)" in used.stderr
    missing = vlmtune("predict", str(run), "-i", str(IMAGE), "-p", PROMPT, "--checkpoint", "6")
    assert missing.returncode == 2 and "no checkpoint '6'" in missing.stderr
    assert "checkpoint-4, checkpoint-8" in missing.stderr


# --- model.adapter: a new run starts from the same weights predict uses ------------------------------


@pytest.mark.slow
def test_model_adapter_starts_from_the_best_checkpoint_unless_the_recipe_picks_another(stopped_run):
    from vlmtune.after.trained import start_from
    from vlmtune.recipe import LoraSection, ModelSection

    run, _ = stopped_run
    best_start = start_from(ModelSection(name="tiny:qwen2_vl", adapter=str(run)), LoraSection())
    assert best_start.adapter == run / rundir.CHECKPOINTS / "checkpoint-4"
    assert best_start.figures() == {
        "start_from": {
            "weights": str(run / rundir.CHECKPOINTS / "checkpoint-4"),
            "which": f"the best checkpoint checkpoint-4 (eval_scripted 0.9) of run {run}",
        }
    }
    for picked, folder in (("last", run / rundir.ADAPTER), ("8", run / rundir.CHECKPOINTS / "checkpoint-8")):
        model = ModelSection(name="tiny:qwen2_vl", adapter=str(run), adapter_checkpoint=picked)
        assert start_from(model, LoraSection()).adapter == folder, picked


@pytest.mark.slow
def test_a_run_on_model_adapter_trains_on_the_best_weights_and_says_so(stopped_run, tmp_path: Path):
    """One step at a learning rate too small to move a bf16 weight: the new run's final adapter is the
    weights it started from, which are checkpoint-4's and not the earlier run's final ones."""
    from safetensors.torch import load_file

    run, _ = stopped_run
    recipe = overfit_recipe(tmp_path, max_steps=1, lr=1e-12, eval_generate=False)
    result = vlmtune(
        "train", str(recipe), "--set", f"model.adapter={run}", "--run-dir", str(tmp_path / "next")
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting from the best checkpoint checkpoint-4 (eval_scripted 0.9) of run {run}" in result.stderr
    load = json.loads((tmp_path / "next" / rundir.SUMMARY).read_text())["stages"]["load"]
    assert load["start_from"]["weights"] == str(run / rundir.CHECKPOINTS / "checkpoint-4")

    trained_on = load_file(str(tmp_path / "next" / rundir.ADAPTER / rundir.PEFT_WEIGHTS))
    best_weights = load_file(str(run / rundir.CHECKPOINTS / "checkpoint-4" / rundir.PEFT_WEIGHTS))
    final_weights = load_file(str(run / rundir.ADAPTER / rundir.PEFT_WEIGHTS))
    lora_b = [name for name in best_weights if "lora_B" in name]
    assert lora_b and all(trained_on[n].float().allclose(best_weights[n].float(), atol=1e-6) for n in lora_b)
    assert not all(trained_on[n].float().allclose(final_weights[n].float(), atol=1e-6) for n in lora_b)


def test_model_adapter_checkpoint_takes_the_checkpoint_words_and_needs_model_adapter(tmp_path: Path):
    from posttrain_fixtures import fake_run

    from vlmtune.after.trained import start_from
    from vlmtune.errors import RunDirError
    from vlmtune.recipe import LoraSection, ModelSection

    assert (
        ModelSection(name="tiny:qwen2_vl", adapter="runs/a", adapter_checkpoint=40).adapter_checkpoint == "40"
    )
    with pytest.raises(ValueError, match="expects last, best, a step .40. or checkpoint-40, got 'newest'"):
        ModelSection(name="tiny:qwen2_vl", adapter="runs/a", adapter_checkpoint="newest")
    with pytest.raises(ValueError, match="model.adapter is not set"):
        ModelSection(name="tiny:qwen2_vl", adapter_checkpoint="best")
    earlier = fake_run(
        tmp_path / "sft"
    )  # kept no best checkpoint: its final weights, unless best is insisted on
    plain = start_from(ModelSection(name="tiny:qwen2_vl", adapter=str(earlier)), LoraSection())
    assert plain.adapter == earlier / rundir.ADAPTER and plain.which == f"the final weights of run {earlier}"
    with pytest.raises(RunDirError, match="model.adapter: run .* kept no best checkpoint") as raised:
        start_from(
            ModelSection(name="tiny:qwen2_vl", adapter=str(earlier), adapter_checkpoint="best"), LoraSection()
        )
    assert raised.value.hint.startswith("set model.adapter_checkpoint: last")


def _checkpoint(folder: Path, step: int, value: float | None) -> None:
    from vlmtune.runs.trainer_checkpoints import mark_complete

    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "weights.json").write_text("{}")
    mark_complete(path, {"metrics": {"eval_cer": value}} if value is not None else {})


@pytest.mark.parametrize(("greater", "expected"), [(False, 4), (True, 6)])
def test_rotation_keeps_the_best_beside_the_newest(tmp_path: Path, greater: bool, expected: int):
    for step, value in ((2, 0.5), (4, 0.1), (6, 0.9), (8, None), (10, 0.3)):
        _checkpoint(tmp_path, step, value)
    assert best(tmp_path, "eval_cer", greater).step == expected
    rotate(tmp_path, 1, ("eval_cer", greater))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({f"checkpoint-{expected}", "checkpoint-10"})


def test_the_tracker_reads_every_objectives_eval_row_and_stops_on_patience():
    from transformers import TrainerControl, TrainerState

    from vlmtune.recipe import TrainSection
    from vlmtune.training.best import BestTracker

    dpo = BestTracker.from_section(
        TrainSection(
            best_metric="preference_accuracy", eval_steps=5, save_steps=10, early_stopping_patience=1
        )
    )
    assert (dpo.key, dpo.greater) == ("eval_preference_accuracy", True)
    state, control = TrainerState(), TrainerControl()
    for step, value in ((5, 0.6), (10, 0.7), (15, 0.7)):  # TRL's key; a tie does not improve
        state.global_step = step
        dpo.on_log(None, state, control, logs={"eval_rewards/accuracies": value, "eval_loss": 0.5})
    assert dpo.best == (10, 0.7) and dpo.measured == {5: 0.6, 10: 0.7, 15: 0.7}
    assert control.should_training_stop and "best 0.7 at step 10" in dpo.stopped
    assert dpo.marker(10) == {"metrics": {"eval_preference_accuracy": 0.7}} and dpo.marker(12) == {}

    loss = BestTracker.from_section(TrainSection(best_metric="loss", eval_steps=5, save_steps=5))
    assert (loss.key, loss.greater, loss.patience) == ("eval_loss", False, None)
    state.global_step, control = 5, TrainerControl()
    loss.on_log(None, state, control, logs={"loss": 0.1})  # a train row: not the eval loss
    loss.on_log(None, state, control, logs={"eval_loss": 2.0})
    assert loss.measured == {5: 2.0} and not control.should_training_stop
    flipped = TrainSection(best_metric="cer", eval_generate_steps=5, save_steps=5, greater_is_better=True)
    assert BestTracker.from_section(flipped).greater is True


def test_the_curves_picture_draws_the_answer_metrics(tmp_path: Path):
    from vlmtune.observe import curves

    rows = [
        {"step": 1, "loss": 2.0},
        {"step": 2, "eval_exact_match": 0.0, "eval_anls": 0.4, "eval_cer": 0.9, "eval_bleu": 3.0},
        {"step": 4, "eval_exact_match": 0.5, "eval_anls": 0.8, "eval_cer": 0.2, "eval_bleu": 40.0},
    ]
    drawn = curves.extract(rows)
    assert [s.key for s in drawn["answer scores"]] == ["eval_exact_match", "eval_anls"]
    assert drawn["answer error rates"][0].values == (0.9, 0.2)
    assert drawn["answer BLEU / chrF"][0].steps == (2, 4)
    titles = [panel.title for panel in curves.drawn_panels(drawn)]
    assert {"answer scores", "answer error rates", "answer BLEU / chrF"} <= set(titles)
    assert curves.write_png(drawn, tmp_path / "curves.png", "run").stat().st_size > 0


def test_a_resume_counts_the_patience_on_from_the_logged_measurements(tmp_path: Path):
    from vlmtune.training.best import BestTracker

    rows = [{"step": 2, "eval_anls": 0.5}, {"step": 3, "loss": 1.0}, {"step": 4, "eval_anls": 0.4},
            {"step": 6, "eval_anls": 0.3}, {"step": 8, "eval_anls": 0.9}]  # fmt: skip
    (tmp_path / rundir.METRICS).parent.mkdir(parents=True)
    (tmp_path / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    tracker = BestTracker("eval_anls", True, patience=3)
    tracker.restore(tmp_path / rundir.CHECKPOINTS, up_to=6)  # resumed from checkpoint-6: step 8 is redone
    assert tracker.best == (2, 0.5) and tracker.since_best == 2 and not tracker.stopped
    assert tracker.observe(8, 0.45), "the third measurement without improvement stops, across the resume"


PERSISTENT = """
from pathlib import Path

VALUES = [0.2, 0.9, 0.5, 0.4, 0.3, 0.2]
CALLS = Path(__file__).with_name("calls.txt")  # survives the kill, so the series goes on after the resume


def scripted(predictions):
    done = len(CALLS.read_text()) if CALLS.exists() else 0
    CALLS.write_text("x" * (done + 1))
    return VALUES[done]
"""


@pytest.mark.slow
def test_early_stopping_counts_on_across_a_kill_and_resume(tmp_path: Path):
    """Killed after step 4 (0.2, then the best 0.9): the resume must still stop at step 8 (0.5, 0.4);
    a resume that forgot the measurements would take 0.5 as its best and stop only at step 10."""
    import os
    import signal
    import sys

    from conftest import ROOT

    (tmp_path / "my_metric.py").write_text(PERSISTENT)
    recipe = overfit_recipe(
        tmp_path, max_steps=20, save_steps=2, save_total_limit=1, eval_generate=False,
        eval_generate_steps=2, eval_max_samples=1, eval_max_new_tokens=4, metrics=["exact_match"],
        metric_function="my_metric:scripted", allow_metric_code=True, best_metric="scripted",
        early_stopping_patience=2,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    killed = spawn.run(
        [sys.executable, str(ROOT / "tests" / "faults.py"), "SIGKILL@step:4", "--", "train", str(recipe),
         "--run-dir", str(tmp_path / "run")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr[-3000:]
    resumed = vlmtune("train", "--resume", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    train = json.loads((tmp_path / "run" / rundir.SUMMARY).read_text())["stages"]["train"]
    assert train["steps"] == 8 and "best 0.9 at step 4" in train["stopped_early"]
    assert train["best_checkpoint"]["step"] == 4
