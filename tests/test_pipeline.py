"""Pipeline glue: the memory estimate written before loading, and its warning."""

from __future__ import annotations

from pathlib import Path

from vlmtune import pipeline
from vlmtune.recipe import load_recipe
from vlmtune.runs import rundir as files
from vlmtune.runs.rundir import RunDir

from conftest import ROOT


def test_memory_estimate_is_written_and_warns_when_the_device_is_too_small(tmp_path: Path, monkeypatch):
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    run = RunDir.create(tmp_path, "r")
    warnings: list[str] = []
    monkeypatch.setattr(pipeline.checkpoint, "free_memory", lambda device: 1024)
    figures = pipeline.estimate_memory(run, recipe, "cpu", warnings.append)
    estimate = run.read_json(files.MEMORY_ESTIMATE)
    # On CPU the CUDA context is no cost, so it is left out of what must fit.
    assert figures["estimated_peak_bytes"] == estimate["peak_bytes"] - estimate["terms"]["overhead"] > 1024
    assert len(warnings) == 1 and "exceeds the 1.00 KiB free on cpu" in warnings[0]

    warnings.clear()
    monkeypatch.setattr(pipeline.checkpoint, "free_memory", lambda device: 1 << 50)
    pipeline.estimate_memory(run, recipe, "cpu", warnings.append)
    assert warnings == []


def test_an_estimator_failure_warns_and_training_goes_on(tmp_path: Path, monkeypatch):
    import vlmtune.memory

    def broken(recipe):
        raise KeyError("vision_config")

    monkeypatch.setattr(vlmtune.memory, "estimate_recipe", broken)
    warnings: list[str] = []
    run = RunDir.create(tmp_path, "r")
    assert (
        pipeline.estimate_memory(run, load_recipe(ROOT / "recipes" / "demo.yaml"), "cpu", warnings.append)
        == {}
    )
    assert "no memory estimate" in warnings[0] and not (run / files.MEMORY_ESTIMATE).exists()
