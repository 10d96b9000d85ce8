"""See what a run did, without training: curves, measured memory, `vlmtune runs`, `report`, trackers, noise."""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import sys
from pathlib import Path

import pytest

from vlmtune.errors import RecipeError
from vlmtune.observe import curves, memory, noise, trackers
from vlmtune.observe.metrics import read_rows
from vlmtune.runs import rundir
from vlmtune.runs.rundir import RunDir

from conftest import ROOT
from observe_fixtures import MiB, make_run, rows, runs_in_every_state
from test_cli import vlmtune

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which a PNG must start with."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def mixed_rows() -> list[dict]:
    """SFT rows, eval rows, a DPO-style row with extra keys and no token accuracy, a diverged step."""
    train = rows([2.0, 1.8, 1.5, 1.4])
    evals = [{"step": 2, "eval_loss": 1.9, "eval_token_accuracy": 0.2},
             {"step": 4, "eval_loss": 1.6, "eval_runtime": 0.5, "eval_token_accuracy": 0.3}]  # fmt: skip
    dpo = {"step": 5, "loss": 1.3, "learning_rate": 2e-4, "rewards/chosen": 0.4, "logps/rejected": [-1.0]}
    diverged = {"step": 6, "loss": float("nan"), "grad_norm": float("inf"), "learning_rate": 1e-4}
    return [train[0], train[1], evals[0], train[2], train[3], evals[1], dpo, diverged]


# --- curves --------------------------------------------------------------------------------------


def test_curves_take_every_logged_value_and_ignore_other_keys():
    drawn = curves.extract(mixed_rows())
    by_key = {s.key: s for panel in drawn.values() for s in panel}
    assert by_key["loss"].steps == (1, 2, 3, 4, 5, 6)
    assert by_key["loss"].values[:5] == (2.0, 1.8, 1.5, 1.4, 1.3) and math.isnan(by_key["loss"].values[5])
    assert by_key["eval_loss"].steps == (2, 4) and by_key["eval_loss"].values == (1.9, 1.6)
    assert by_key["learning_rate"].values[-2:] == (2e-4, 1e-4)
    assert by_key["token_accuracy"].steps == (1, 2, 3, 4), "the DPO row has no accuracy: it adds no point"
    assert by_key["eval_token_accuracy"].values == (0.2, 0.3)
    assert set(drawn) == {p.title for p in curves.PANELS}
    assert not any(key.startswith(("rewards", "logps")) for key in by_key)


def test_the_picture_is_a_png_drawn_from_metrics_jsonl(tmp_path: Path):
    run = make_run(tmp_path, "r", "done", 0, mixed_rows())
    logged = read_rows(run)
    drawn = curves.extract(logged)
    fig = curves.figure(drawn, "r")
    plotted = {ax.get_title(): {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                                for line in ax.get_lines()} for ax in fig.axes}  # fmt: skip
    train_losses = [(r["step"], r["loss"]) for r in logged if "loss" in r]
    xs, ys = plotted["loss"]["train"]
    assert xs == [s for s, _ in train_losses]
    assert ys[:-1] == [v for _, v in train_losses][:-1] and math.isnan(ys[-1])
    assert plotted["loss"]["eval"] == ([2, 4], [1.9, 1.6])
    assert plotted["learning rate"]["learning rate"][1] == [
        r["learning_rate"] for r in logged if "learning_rate" in r
    ]
    assert plotted["gradient norm"]["grad norm"][1][:4] == [
        r["grad_norm"] for r in logged[:5] if "grad_norm" in r
    ]
    assert plotted["token accuracy"]["eval"] == ([2, 4], [0.2, 0.3])

    path = curves.write_png(drawn, tmp_path / "out" / "curves.png", "r")
    assert png_size(path) == (1100, 700), "SFT: loss, learning rate, grad norm, token accuracy"
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decodes every pixel: a truncated file raises
        colours = image.convert("RGB").getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50, "a blank picture has a handful of colours; curves have many"
    assert [p.name for p in path.parent.iterdir()] == ["curves.png"], "no temporary file left behind"


def plotted_lines(fig) -> dict[str, dict[str, list]]:
    return {ax.get_title(): {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}
            for ax in fig.axes}  # fmt: skip


def test_a_dpo_run_draws_its_rewards_and_preference_accuracy_instead_of_token_accuracy(tmp_path: Path):
    logged = [{"step": s, "loss": 0.7 - s / 100, "learning_rate": 1e-5, "grad_norm": 1.0,
               "reward_chosen": s / 10, "reward_rejected": -s / 10, "reward_margin": s / 5,
               "preference_accuracy": 0.5 + s / 20} for s in (1, 2, 3)]  # fmt: skip
    logged.append({"step": 3, "eval_loss": 0.6, "eval_preference_accuracy": 0.75})
    fig = curves.figure(curves.extract(logged), "dpo")
    lines = plotted_lines(fig)
    assert list(lines) == [
        "loss",
        "learning rate",
        "gradient norm",
        "preference rewards",
        "preference accuracy",
    ]
    assert lines["preference rewards"] == {"chosen": [0.1, 0.2, 0.3], "rejected": [-0.1, -0.2, -0.3],
                                           "margin": [0.2, 0.4, 0.6]}  # fmt: skip
    assert lines["preference accuracy"] == {"train": [0.55, 0.6, 0.65], "eval": [0.75]}
    path = curves.write_png(curves.extract(logged), tmp_path / "curves.png", "dpo")
    assert png_size(path) == (1650, 700), "five panels: two rows of three"
    summary = dict(curves.summary_lines(curves.extract(logged)))
    assert summary["reward margin"] == "0.200 -> 0.600" and summary["pref. accuracy"] == "0.550 -> 0.650"
    assert "token accuracy" not in summary


def test_a_grpo_run_draws_its_reward_and_kl():
    logged = [{"step": s, "loss": 0.0, "learning_rate": 1e-5, "grad_norm": 0.5, "reward": r, "kl": s / 1000}
              for s, r in ((1, 0.25), (2, 0.5), (3, 0.75), (4, 0.5))]  # fmt: skip
    logged.append({"step": 4, "eval_loss": 0.0, "eval_reward": 0.6})
    lines = plotted_lines(curves.figure(curves.extract(logged), "grpo"))
    assert list(lines) == ["loss", "learning rate", "gradient norm", "reward", "kl"]
    assert lines["reward"] == {"train": [0.25, 0.5, 0.75, 0.5], "eval": [0.6]}
    summary = dict(curves.summary_lines(curves.extract(logged)))
    assert summary["reward"].endswith("0.250 -> 0.500 (max 0.750 at step 3)")
    assert summary["eval reward"] == "0.600 -> 0.600" and summary["kl"] == "0.0010 -> 0.0040"


def test_a_panel_with_nothing_logged_says_so():
    fig = curves.figure(curves.extract([{"step": 1, "loss": 1.0}]), "r")
    empty = [ax for ax in fig.axes if ax.get_title() == "gradient norm"][0]
    assert not empty.get_lines() and [t.get_text() for t in empty.texts] == ["not logged"]


def test_terminal_summary_lines():
    lines = dict(curves.summary_lines(curves.extract(mixed_rows())))
    assert lines["loss"].startswith("█") and "!" in lines["loss"], "falls from the top; the NaN is marked"
    assert "2.0000 -> nan (min 1.3000 at step 5), 6 steps logged" in lines["loss"]
    assert lines["eval loss"] == "1.9000 -> 1.6000 (2 evaluations, best 1.6000 at step 4)"
    assert lines["grad norm"] == "1.100 -> inf (max 1.4 at step 4)"
    assert lines["token accuracy"] == "0.050 -> 0.200" and lines["eval accuracy"] == "0.200 -> 0.300"
    assert curves.summary_lines(curves.extract([{"step": 1, "eval_loss": 2.0}])) == [
        ("eval loss", "2.0000 -> 2.0000 (1 evaluation)")
    ]
    assert curves.sparkline(tuple(range(100)), width=10) == "▁▂▃▃▄▅▆▆▇█"


def test_metrics_reader_skips_a_half_written_last_line(tmp_path: Path):
    run = make_run(tmp_path, "r", "running", 0, rows([1.0, 0.5]), partial_line='{"step": 3, "lo')
    assert [r["step"] for r in read_rows(run)] == [1, 2]
    assert read_rows(tmp_path / "nowhere") == []


# --- measured memory -------------------------------------------------------------------------------


def test_cpu_peak_is_compared_above_the_floor_before_loading():
    estimate = {"peak_bytes": 600 * MiB, "terms": {"overhead": 500 * MiB}}
    logged = rows([1.0, 0.9, 0.8], rss=1000 * MiB)  # 1001, 1002, 1003 MiB
    figures = memory.measured_peak(logged, estimate, 403 * MiB)
    assert figures == {"device": "cpu", "peak_bytes": 1003 * MiB, "baseline_bytes": 403 * MiB,
                       "estimated_bytes": 100 * MiB, "ratio": 6.0}  # fmt: skip
    assert memory.describe(figures) == (
        "peak RSS 1003.00 MiB, 600.00 MiB above the 403.00 MiB before loading; "
        "estimated 100.00 MiB: measured/estimated 6.00"
    )
    no_floor = memory.measured_peak(logged, estimate, None)
    assert no_floor["ratio"] is None and memory.describe(no_floor).startswith(
        "peak RSS 1003.00 MiB; estimated"
    )
    assert memory.measured_peak(logged, None, 0)["ratio"] is None
    assert memory.describe(memory.measured_peak(logged, None, 0)).endswith("; no estimate")
    assert memory.measured_peak(rows([1.0]), estimate, 0) == {}, "rows without memory keys: no figure"


def test_cuda_peak_is_the_highest_reserved_figure():
    logged = [
        {"step": 1, "loss": 1.0, "peak_allocated_since_start_bytes": 7 * MiB,
         "peak_reserved_since_start_bytes": 9 * MiB, "peak_rss_since_start_bytes": 3000 * MiB},
        {"step": 2, "loss": 0.9, "peak_allocated_since_start_bytes": 8 * MiB,
         "peak_reserved_since_start_bytes": 9 * MiB, "peak_rss_since_start_bytes": 3001 * MiB},
    ]  # fmt: skip
    estimate = {"peak_bytes": 510 * MiB, "terms": {"overhead": 500 * MiB}}
    figures = memory.measured_peak(logged, estimate, 400 * MiB)
    assert figures == {"device": "cuda", "peak_bytes": 9 * MiB, "peak_allocated_bytes": 8 * MiB, "baseline_bytes": 0,
                       "rss_peak_bytes": 3001 * MiB, "estimated_bytes": 10 * MiB, "ratio": 0.9}  # fmt: skip
    assert memory.describe(figures) == (
        "peak 9.00 MiB reserved (8.00 MiB allocated); estimated 10.00 MiB: measured/estimated 0.90"
    )


def test_the_sampler_reads_the_peaks_and_never_resets_them(tmp_path: Path, monkeypatch):
    """No GPU here: torch.cuda's counters are a fake that records any reset.

    The counters belong to the whole process: code around a run (Unsloth-style notebooks,
    bench/gpu.py) reads them after training, so a reset per row would cut them to the last interval.
    """
    import torch

    from vlmtune.observe.sampler import PeakMemory
    from vlmtune.training.callbacks import MetricsWriter

    counters = {"allocated": 0, "reserved": 0, "resets": 0}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: counters["allocated"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: counters["reserved"])
    monkeypatch.setattr(
        torch.cuda, "reset_peak_memory_stats", lambda *a: counters.update(resets=counters["resets"] + 1)
    )

    class State:
        global_step = 0

    run = RunDir.create(tmp_path, "r")
    sampler, writer, state = PeakMemory("cuda"), MetricsWriter(run), State()
    sampler.on_train_begin(None, state, None)
    for step, (allocated, reserved) in enumerate([(5, 8), (6, 8), (6, 10)], start=1):
        counters.update(allocated=allocated, reserved=reserved)
        state.global_step = step
        logs = {"loss": 1.0 / step, "learning_rate": 1e-3}
        for callback in (sampler, writer):  # the order attach() sets: the sampler first
            callback.on_log(None, state, None, logs=logs)
    sampler.on_train_end(None, state, None)
    assert counters["resets"] == 0
    logged = run.read_jsonl(rundir.METRICS)
    assert [(r["peak_allocated_since_start_bytes"], r["peak_reserved_since_start_bytes"]) for r in logged] == [
        (5, 8), (6, 8), (6, 10)
    ]  # fmt: skip
    if sys.platform == "linux":
        assert all(r["peak_rss_since_start_bytes"] > 50 * MiB for r in logged)
        assert logged[2]["peak_rss_since_start_bytes"] >= logged[0]["peak_rss_since_start_bytes"]

    logs = {"loss": 1.0}
    monkeypatch.setattr(
        torch.cuda, "max_memory_reserved", lambda *a: pytest.fail("a CPU run reads no CUDA counter")
    )
    PeakMemory("cpu").on_log(None, state, None, logs=logs)
    assert "peak_reserved_since_start_bytes" not in logs


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/self/status is Linux's")
def test_rss_figures_are_the_kernels():
    status = Path("/proc/self/status").read_text()
    hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024
    assert abs(memory.rss_high_water_mark() - hwm) < 64 * MiB
    assert 0 < memory.current_rss() <= memory.rss_high_water_mark()


# --- trackers ---------------------------------------------------------------------------------------


def test_every_tracker_the_recipe_accepts_is_one_the_trainer_knows():
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    from vlmtune.choices import Tracker, words

    assert set(words(Tracker)) == set(trackers.TRACKERS) == set(INTEGRATION_TO_CALLBACK) - {"kubeflow"}


def test_report_to_in_the_recipe(tmp_path: Path):
    from vlmtune.recipe import load_recipe

    base = "model: {name: tiny:qwen2_vl}\ndata: {train: x.jsonl}\n"
    path = tmp_path / "r.yaml"
    for written, expected in [("", []), ("report_to: wandb", ["wandb"]), ("report_to: none", []),
                              ("report_to: [tensorboard, mlflow]", ["tensorboard", "mlflow"])]:  # fmt: skip
        path.write_text(base + (f"output: {{{written}}}\n" if written else ""))
        assert load_recipe(path).output.report_to == expected
    path.write_text(base + "output:\n  report_to: [tensorbored]\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "output.report_to.0 (in the section at line 4)" in str(err.value) and "'tensorboard'" in str(
        err.value
    )


def hide_modules(monkeypatch, *hidden: str) -> None:
    """As if these packages were not installed: find_spec answers None for them only."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name.split(".")[0] in hidden else real(name, *a)
    )


def test_a_missing_tracker_names_the_pip_command(monkeypatch):
    hide_modules(monkeypatch, "wandb", "dagshub", "mlflow")
    trackers.require_installed(["tensorboard"])  # installed (a dev dependency): no error
    with pytest.raises(RecipeError) as err:
        trackers.require_installed(["tensorboard", "wandb", "dagshub", "mlflow"])
    assert str(err.value) == (
        "output.report_to names wandb, dagshub, mlflow, which are not installed here\n"
        "hint: pip install wandb dagshub mlflow  (or remove them from output.report_to)"
    )


def test_train_with_a_missing_tracker_exits_2_before_any_model_loads(tmp_path: Path, monkeypatch, capsys):
    from vlmtune import cli
    from vlmtune.stages import load

    hide_modules(monkeypatch, "wandb")

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(load, "load", no_loading)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{name: tiny:qwen2_vl}}\ndata: {{train: {ROOT / 'data/demo/train.jsonl'}}}\n"
                      f"output: {{dir: {tmp_path / 'runs'}, report_to: [tensorboard, wandb]}}\n")  # fmt: skip
    monkeypatch.setattr(sys, "argv", ["vlmtune", "train", str(recipe)])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "output.report_to names wandb, which is not installed here" in err
    assert "hint: pip install wandb" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "no run folder is made for a recipe that cannot run"


# --- noise ------------------------------------------------------------------------------------------


def test_the_noise_filter_matches_the_message_where_bitsandbytes_writes_it():
    import inspect

    import bitsandbytes.backends.cpu.ops as source

    logger_name, prefix, _ = noise.KNOWN_NOISE[0]
    assert source.logger.name == logger_name
    assert f'"{prefix}: %s.' in inspect.getsource(source), (
        "bitsandbytes changed the message: update KNOWN_NOISE"
    )


def test_the_filter_drops_that_message_only(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    noise.silence_known_noise()
    noise.silence_known_noise()  # idempotent
    assert sum(isinstance(f, noise.DropMessage) for f in logger.filters) == 1
    with caplog.at_level(logging.WARNING):
        logger.warning(
            "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels"
        )
        logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]


# --- vlmtune runs and vlmtune report ------------------------------------------------------------------

RUN_KEYS = {"name", "path", "model", "objective", "status", "created", "steps", "first_loss", "last_loss",
            "peak_memory_bytes", "seconds", "eval_metric", "eval_score", "problem"}  # fmt: skip


@pytest.fixture(scope="module")
def run_folders(tmp_path_factory) -> dict[str, Path]:
    return runs_in_every_state(tmp_path_factory.mktemp("runs") / "runs")


def test_runs_json_lists_every_state_newest_first_with_stable_keys(run_folders: dict[str, Path]):
    root = run_folders["finished"].parent
    result = vlmtune("runs", str(root), "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)  # strict JSON: a NaN loss must be null
    assert all(set(entry) == RUN_KEYS for entry in listed)
    by_name = {entry["name"]: entry for entry in listed}
    # broken has no `created`: its folder's time (now) sorts it first
    assert [e["name"] for e in listed] == [
        "broken",
        "just-started",
        "running",
        "interrupted",
        "failed",
        "finished",
    ]
    assert by_name["finished"] | {"path": None} == {
        "name": "finished", "path": None, "model": "tiny:qwen2_vl", "objective": "sft", "status": "done",
        "created": "2026-11-20T09:00:00", "steps": 3, "first_loss": 2.0, "last_loss": 1.0,
        "peak_memory_bytes": 903 * MiB, "seconds": 35.5, "eval_metric": None, "eval_score": None, "problem": None,
    }  # fmt: skip
    failed = by_name["failed"]
    assert failed["status"] == "failed" and failed["first_loss"] == 3.0 and failed["last_loss"] is None
    assert failed["steps"] == 2 and failed["peak_memory_bytes"] == 802 * MiB and failed["seconds"] == 15.0
    interrupted = by_name["interrupted"]
    assert (interrupted["objective"], interrupted["model"]) == ("dpo", "Qwen/Qwen2-VL-2B-Instruct")
    assert (interrupted["status"], interrupted["steps"], interrupted["last_loss"]) == ("interrupted", 4, 3.0)
    assert interrupted["seconds"] == 63.0
    running = by_name["running"]
    assert (running["status"], running["steps"], running["first_loss"], running["last_loss"]) == (
        "running", 2, 5.0, 4.0), "the half-written row is not counted"  # fmt: skip
    assert running["peak_memory_bytes"] == 602 * MiB and 100 <= running["seconds"] < 400
    assert by_name["just-started"]["steps"] is None and by_name["just-started"]["peak_memory_bytes"] is None
    assert by_name["broken"]["status"] == "damaged" and by_name["broken"]["model"] is None
    assert (
        by_name["broken"]["problem"] == "summary.json cannot be read"
        and by_name["finished"]["problem"] is None
    )
    assert "not-a-run" not in by_name


def test_runs_table(run_folders: dict[str, Path]):
    result = vlmtune("runs", str(run_folders["finished"].parent), env_extra={"COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == [
        "run",
        "model",
        "objective",
        "status",
        "steps",
        "loss",
        "eval",
        "peak",
        "memory",
        "time",
    ]
    finished = next(line for line in lines if line.startswith("finished"))
    assert finished.split() == ["finished", "tiny:qwen2_vl", "sft", "done", "3", "2.000", "->", "1.000", "-",
                                "903.00", "MiB", "36s"]  # fmt: skip
    assert "3.000 -> nan" in next(line for line in lines if line.startswith("failed"))
    assert [line.split()[0] for line in lines[1:]] == ["broken", "just-started", "running", "interrupted",
                                                       "failed", "finished"]  # fmt: skip


def test_runs_of_one_run_folder_and_of_nothing(run_folders: dict[str, Path], tmp_path: Path):
    one = json.loads(vlmtune("runs", str(run_folders["failed"]), "--json").stdout)
    assert [e["name"] for e in one] == ["failed"]
    assert json.loads(vlmtune("runs", str(tmp_path), "--json").stdout) == []
    assert "no run folders in" in vlmtune("runs", str(tmp_path)).stdout
    missing = vlmtune("runs", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr and "hint:" in missing.stderr


def test_report_draws_a_running_run_and_leaves_a_finished_picture_alone(tmp_path: Path):
    folders = runs_in_every_state(tmp_path / "runs")
    running = folders["running"]
    result = vlmtune("report", str(running))
    assert result.returncode == 0, result.stderr
    assert "running (tiny:qwen2_vl, sft): running, 2 steps in" in result.stdout
    assert "5.0000 -> 4.0000" in result.stdout and "eval loss" in result.stdout
    assert "peak RSS 602.00 MiB, 202.00 MiB above the 400.00 MiB before loading; no estimate" in result.stdout
    assert png_size(running / rundir.CURVES) == (1100, 700)

    finished = folders["finished"]
    (finished / rundir.CURVES).write_bytes(b"the picture drawn when training ended")
    result = vlmtune("report", str(finished))
    assert result.returncode == 0, result.stderr
    assert (finished / rundir.CURVES).read_bytes() == b"the picture drawn when training ended"
    assert "(drawn when training ended)" in result.stdout
    assert "estimated 500.00 MiB: measured/estimated 1.01" in result.stdout
    copy = tmp_path / "copy.png"
    assert vlmtune("report", str(finished), "--out", str(copy)).returncode == 0 and png_size(copy)

    result = vlmtune("report", str(folders["just-started"]))
    assert result.returncode == 0 and "nothing to draw" in result.stdout
    assert not (folders["just-started"] / rundir.CURVES).exists()
    result = vlmtune("report", str(tmp_path))
    assert result.returncode == 2 and "not a vlmtune run folder" in result.stderr


@pytest.mark.parametrize("command", ["runs", "report"])
def test_new_commands_have_help(command: str):
    result = vlmtune(command, "--help")
    assert result.returncode == 0 and "Examples" in result.stdout


DAMAGES = {
    "metrics.jsonl is a folder": lambda p: ((p / rundir.METRICS).unlink(), (p / rundir.METRICS).mkdir()),
    "stages is a list": lambda p: (p / rundir.SUMMARY).write_text('{"status": "done", "stages": [1, 2]}'),
    "train is a string": lambda p: (p / rundir.SUMMARY).write_text(
        '{"status": "done", "stages": {"train": "x"}}'
    ),
    "memory is a string": lambda p: (p / rundir.SUMMARY).write_text(
        '{"status": "done", "stages": {"train": {"memory": "x", "started": "a", "seconds": "b"}}}'
    ),
    "binary metrics": lambda p: (p / rundir.METRICS).write_bytes(b"\xff\xfe\x00" * 10 + b'\n{"step": 1}\n'),
    "status is a list": lambda p: (p / rundir.SUMMARY).write_text('{"status": [1], "stages": {}}'),
    "model name is a list": lambda p: (p / rundir.RESOLVED).write_text("a: &a [x]\nmodel: {name: [*a]}\n"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_one_damaged_run_folder_never_breaks_runs_or_report(tmp_path: Path, damage: str):
    folders = runs_in_every_state(tmp_path / "runs")
    DAMAGES[damage](folders["finished"])
    listed = vlmtune("runs", str(tmp_path / "runs"), "--json")
    assert listed.returncode == 0 and "Traceback" not in listed.stderr, listed.stderr[-2000:]
    by_name = {entry["name"]: entry for entry in json.loads(listed.stdout)}
    assert len(by_name) == 6 and by_name["failed"]["status"] == "failed", "every other run still listed"
    table = vlmtune("runs", str(tmp_path / "runs"))
    assert table.returncode == 0 and "finished" in table.stdout, table.stderr[-2000:]
    for run in (folders["finished"], folders["running"]):
        result = vlmtune("report", str(run), "--out", str(tmp_path / f"{run.name}.png"))
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    if damage == "status is a list":
        assert by_name["finished"]["status"] == "damaged" and by_name["finished"]["problem"]


def test_report_out_never_overwrites_what_is_not_its_picture(tmp_path: Path):
    folders = runs_in_every_state(tmp_path / "runs")
    running = folders["running"]
    precious = tmp_path / "adapter_model.safetensors"
    precious.write_bytes(b"weights")
    result = vlmtune("report", str(running), "--out", str(precious))
    assert result.returncode == 2 and "exists and is not a PNG picture" in result.stderr
    result = vlmtune("report", str(running), "--out", str(precious), "--force")
    assert result.returncode == 2 and precious.read_bytes() == b"weights"
    result = vlmtune("report", str(running), "--out", str(tmp_path))
    assert result.returncode == 2 and "is a folder; --out names the picture file" in result.stderr
    picture = tmp_path / "loss.png"
    assert vlmtune("report", str(running), "--out", str(picture)).returncode == 0 and png_size(picture)
    again = vlmtune("report", str(running), "--out", str(picture))
    assert again.returncode == 2 and "already exists" in again.stderr and "--force" in again.stderr
    assert vlmtune("report", str(running), "--out", str(picture), "--force").returncode == 0
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = vlmtune("report", str(running), "--out", str(locked / "loss.png"))
        if os.geteuid() != 0:  # root writes anywhere
            assert result.returncode == 2 and "cannot write the picture" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        locked.chmod(0o700)
    unwritable = vlmtune("report", str(running), "--out", "/proc/loss.png")
    assert unwritable.returncode == 2 and "cannot write the picture /proc/loss.png" in unwritable.stderr
