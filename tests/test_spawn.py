"""tests/spawn.py: a CLI process forked from the preloaded server behaves as `python -m vlmtune` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import spawn

from conftest import ROOT

VLMTUNE = [sys.executable, "-m", "vlmtune"]


def plain_and_forked(*args: str, cwd: Path = ROOT, env: dict | None = None):
    plain = subprocess.run([*VLMTUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    forked = spawn.run([*VLMTUNE, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    return plain, forked


def test_a_forked_command_prints_and_exits_as_a_plain_process(tmp_path: Path):
    (tmp_path / "r.yaml").write_text((ROOT / "recipes/demo.yaml").read_text())
    for args in (["validate", "r.yaml"], ["validate", "missing.yaml"]):
        plain, forked = plain_and_forked(*args, cwd=tmp_path)  # relative paths: the working folder is used
        assert (forked.returncode, forked.stdout, forked.stderr) == (
            plain.returncode,
            plain.stdout,
            plain.stderr,
        )
    assert plain.returncode == 2 and "recipe not found: missing.yaml" in plain.stderr


def test_the_environment_given_is_the_childs():
    env = {**os.environ, "VLMTUNE_DEBUG": "1"}  # read by vlmtune at run time: the fork honours it
    plain, forked = plain_and_forked("validate", "missing.yaml", env=env)
    assert "Traceback" in plain.stderr and "Traceback" in forked.stderr
    assert spawn.forkable([*VLMTUNE, "validate"], env) is not None


def test_commands_the_server_cannot_stand_for_run_as_plain_processes():
    threads = {**os.environ, "OMP_NUM_THREADS": "2"}  # read when the preloaded libraries loaded
    assert spawn.forkable([*VLMTUNE, "--help"], threads) is None
    assert spawn.forkable([sys.executable, "-X", "importtime", "-m", "vlmtune"], dict(os.environ)) is None
    assert spawn.forkable([sys.executable, "-c", "pass"], dict(os.environ)) is None
    assert spawn.forkable(["python3", "-m", "vlmtune"], dict(os.environ)) is None
    assert isinstance(spawn.Popen([sys.executable, "-c", "pass"]), subprocess.Popen)


def test_a_signal_kills_the_forked_process_as_it_would_a_plain_one(tmp_path: Path):
    """A run held at its load stage (tests/faults.py PAUSE, 120 s) is killed: -9, as subprocess reports it."""
    process = spawn.Popen(
        [sys.executable, spawn.FAULTS, "PAUSE@load", "--", "train", str(ROOT / "recipes/demo.yaml"),
         "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert isinstance(process, spawn.ForkedProcess) and process.pid != os.getpid()
    for line in process.stderr:
        if "paused" in line:
            break
    assert process.poll() is None, "still running while paused"
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    out, err = process.communicate(timeout=60)
    assert isinstance(out, str) and isinstance(err, str)


def test_a_timeout_kills_the_child_and_raises_as_subprocess_does():
    with pytest.raises(subprocess.TimeoutExpired):
        spawn.run([*VLMTUNE, "train", str(ROOT / "recipes/demo.yaml")], capture_output=True, timeout=0.2)


def test_the_switch_turns_the_server_off(monkeypatch):
    monkeypatch.setenv("VLMTUNE_TEST_FORKSERVER", "0")
    assert spawn.forkable([*VLMTUNE, "--help"], dict(os.environ)) is None
