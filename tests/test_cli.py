"""The command line: fast help, user errors as a message + hint + exit 2, tracebacks only on --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import spawn

ROOT = Path(__file__).resolve().parent.parent


def vlmtune(*args: str, cwd: Path = ROOT, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_DEBUG"}
    env.update(env_extra or {})
    return spawn.run(
        [sys.executable, "-m", "vlmtune", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_help_imports_neither_torch_nor_transformers():
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from vlmtune.cli import app\n"
        "result = CliRunner().invoke(app, ['--help'])\n"
        "assert result.exit_code == 0, result.output\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'trl', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = spawn.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"--help imported {out.stdout.strip()}"


@pytest.mark.parametrize("command", ["train", "validate", "tiny", "schema", "data"])
def test_every_command_has_help(command: str):
    result = vlmtune(command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


def test_validate_prints_the_resolved_recipe():
    result = vlmtune("validate", "recipes/demo.yaml", "--set", "lora.r=8")
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stdout
    assert "r: 8" in result.stdout and "use_rslora: false" in result.stdout


def test_user_error_is_a_message_with_a_hint_and_no_traceback(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: tiny:qwen2_vl\n  dtyp: bf16\ndata:\n  train: x.jsonl\n")
    result = vlmtune("validate", str(bad))
    assert result.returncode == 2
    assert "model.dtyp (line 3): unknown key; did you mean `model.dtype`?" in result.stderr
    assert "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback(tmp_path: Path):
    result = vlmtune("--debug", "validate", str(tmp_path / "missing.yaml"))
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "recipe not found" in result.stderr


def test_train_needs_a_recipe_or_resume():
    result = vlmtune("train")
    assert result.returncode == 2
    assert "give either a RECIPE or --resume RUN_DIR" in result.stderr


def test_unknown_tiny_family_lists_the_known_ones(tmp_path: Path):
    result = vlmtune("tiny", "qwen9_vl", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "unknown family 'qwen9_vl'" in result.stderr and "qwen2_vl" in result.stderr


def test_schema_is_json():
    result = vlmtune("schema")
    assert result.returncode == 0
    assert json.loads(result.stdout)["title"] == "Recipe"


@pytest.mark.parametrize(
    "args, message", [(["nosuchcmd"], "No such command"), (["train", "--bogus"], "--bogus")]
)
def test_usage_errors_are_short_and_exit_2(args: list[str], message: str):
    result = vlmtune(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
