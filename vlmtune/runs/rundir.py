"""The run folder: the only module that knows artifact file names. Every write is atomic.

runs/<name>-<YYYYmmdd-HHMMSS>/
  recipe.yaml  resolved.yaml  env.json  summary.json
  1-load/  2-lora/  3-train/  4-eval/

Under torchrun every rank holds a RunDir of the same folder, but only the writer's (rank 0's)
writes happen: the others' are no-ops, so every stage and objective writes once without asking.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vlmtune.errors import RunDirError
from vlmtune.redact import redact_secrets

STAGES = ("load", "lora", "train")
STAGE_DIRS = {"load": "1-load", "lora": "2-lora", "train": "3-train", "eval": "4-eval"}

RECIPE = "recipe.yaml"
RESOLVED = "resolved.yaml"
ENV = "env.json"
SUMMARY = "summary.json"
MODEL_REPORT = "1-load/model_report.json"
MEMORY_ESTIMATE = "1-load/memory_estimate.json"
PROCESSOR = "1-load/processor"
LORA_PLAN = "2-lora/lora_plan.json"
ADAPTER_CONFIG = "2-lora/adapter_config.json"
METRICS = "3-train/metrics.jsonl"
CURVES = "3-train/curves.png"  # loss, learning rate, grad norm, token accuracy vs step (vlmtune/observe)
TENSORBOARD = "3-train/tensorboard"  # event files, with output.report_to: [tensorboard]
DATA_REPORT = "3-train/data_report.json"
COMPLETIONS = "3-train/completions.jsonl"  # grpo: a sample of completions and their rewards per logging step
STEP_LOGS = (METRICS, COMPLETIONS)  # rows keyed by step; a resume keeps those up to its checkpoint
CHECKPOINTS = "3-train/checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"  # the HF Trainer's folder names: checkpoint-<step>
CHECKPOINT_MARKER = "vlmtune_complete.json"  # written last into a checkpoint: from then on it counts
TRAINER_STATE = "trainer_state.json"  # the HF Trainer's own file in every checkpoint (its global step)
LOCK = ".lock"  # held (flock) by the one process that trains this run folder
ADAPTER = "3-train/adapter"
FULL_MODEL = "3-train/model"
EVAL_REPORT = "4-eval/eval_report.json"
EVAL_HTML = "4-eval/report.html"  # the eval report as one self-contained page (vlmtune/after/report_html.py)

# summary.json: stages.train[MEASURED_MEMORY] holds the measured peak beside the estimate.
MEASURED_MEMORY = "memory"
# summary.json: [SPEED_SWITCHES] (top level): train.kernels and what it swapped in, train.offload_activations.
SPEED_SWITCHES = "speed_switches"
# summary.json: stages.load[RSS_BEFORE_LOAD], the process's RSS before the model loads (the CPU floor).
RSS_BEFORE_LOAD = "rss_before_load_bytes"

# An export folder (`vlmtune export RUN --out DIR`): peft's and transformers' own file names, so
# plain peft / transformers load it, plus our model card and the checks that proved the export.
EXPORT_CARD = "README.md"
EXPORT_REPORT = "vlmtune_export.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# A GGUF export (`--format gguf`, after/export_gguf.py): llama.cpp's language file and its vision
# projector, named by their quantization, and the Ollama Modelfile that serves them together.
GGUF_MODEL = "model-{quant}.gguf"
GGUF_MMPROJ = "mmproj-{quant}.gguf"
OLLAMA_MODELFILE = "Modelfile"
EXPORT_CURVES = "curves.png"  # a serving export's copy of the run's CURVES, shown in its card


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_text_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file.

    On a full disk the temporary file cannot be written; an existing file is then rewritten in
    place (it reuses its own blocks), so summary.json can still say the run failed.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if exc.errno not in DISK_FULL or not path.is_file():
            raise
        _rewrite_in_place(path, text)
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _rewrite_in_place(path: Path, text: str) -> None:
    with path.open("r+", encoding="utf-8") as f:
        f.write(text)
        f.truncate()


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


@dataclass(frozen=True)
class RunDir:
    path: Path
    writer: bool = True  # False on the ranks of a launch that are not rank 0: they never write here

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    # --- creation -----------------------------------------------------------------------------

    @classmethod
    def create(cls, parent: Path, name: str, exact: Path | None = None) -> RunDir:
        """A new run folder: ``exact`` if given (it must not exist), else parent/name-timestamp."""
        try:
            return cls._create(parent, name, exact)
        except OSError as exc:  # read-only parent, a file where a folder should be, full disk
            where = exc.filename or exact or parent
            raise RunDirError(
                f"cannot create the run folder: {where}: {exc.strerror or exc}",
                hint="choose a writable folder with output.dir (or --run-dir); check that no file stands "
                "where a folder of that path should be",
            ) from None

    @classmethod
    def _create(cls, parent: Path, name: str, exact: Path | None) -> RunDir:
        if exact is not None:
            path = Path(exact)
            if path.exists():
                raise RunDirError(
                    f"run folder {path} already exists; vlmtune never overwrites a run",
                    hint=f"pick a new --run-dir, or continue that run with `vlmtune train --resume {path}`",
                )
        else:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            path = Path(parent) / f"{name}-{stamp}"
            suffix = 1
            while path.exists():  # two runs in one second
                suffix += 1
                path = Path(parent) / f"{name}-{stamp}-{suffix}"
        path.mkdir(parents=True)
        for stage in STAGES:  # 4-eval/ appears only when an evaluation writes to it
            (path / STAGE_DIRS[stage]).mkdir()
        return cls(path)

    @classmethod
    def open(cls, path: Path, writer: bool = True) -> RunDir:
        """An existing run folder, checked to be one (``writer=False``: this rank only reads it)."""
        path = Path(path)
        if not (path / SUMMARY).is_file():
            raise RunDirError(
                f"{path} is not a vlmtune run folder (no {SUMMARY})",
                hint="pass a folder that `vlmtune train` created, e.g. runs/demo-20260101-120000",
            )
        return cls(path, writer)

    # --- files ---------------------------------------------------------------------------------

    def write_json(self, name: str, data: Any) -> Path:
        if self.writer:
            write_json_atomic(self.path / name, data)
        return self.path / name

    def read_json(self, name: str) -> Any:
        """A JSON artifact, or a RunDirError naming the file when it is not (damaged, binary, truncated)."""
        path = self.path / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunDirError(
                f"{path} is damaged: it is not JSON ({str(exc).splitlines()[0]})",
                hint="restore the file from a backup or a copy of the run folder; vlmtune writes it atomically, "
                "so something else changed it",
            ) from None

    def write_text(self, name: str, text: str) -> Path:
        if self.writer:
            write_text_atomic(self.path / name, text)
        return self.path / name

    def write_recipe(self, text: str) -> list[str]:
        """recipe.yaml: the recipe as given, less the secrets it may hold (a token in a comment, a URL's
        credentials); what was redacted is returned and said in the copy's first line."""
        redacted, found = redact_secrets(text)
        if found:
            kinds = ", ".join(sorted(set(found)))
            redacted = f"# vlmtune redacted {len(found)} secret(s) in this copy ({kinds}) as ***\n{redacted}"
        self.write_text(RECIPE, redacted)
        return found

    def append_jsonl(self, name: str, row: dict) -> None:
        if not self.writer:
            return
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def read_jsonl(self, name: str) -> list[dict]:
        """Rows of a JSON-lines artifact. A torn last line (a kill in mid-append) is left out."""
        path = self.path / name
        if not path.is_file():
            return []
        lines = [
            line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
        ]
        rows = []
        for number, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    break
                raise RunDirError(
                    f"{path} is damaged: line {number} is not JSON",
                    hint="restore the file, or delete the damaged lines (each line is one logged step)",
                ) from None
        return rows

    def checkpoints(self) -> list[Path]:
        """The trainer's checkpoint-N folders, oldest step first."""
        folder = self.path / CHECKPOINTS
        found = [
            p
            for p in folder.glob(f"{CHECKPOINT_PREFIX}*")
            if p.name.removeprefix(CHECKPOINT_PREFIX).isdigit()
        ]
        return sorted(found, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))

    def keep_logs_until(self, step: int) -> None:
        """Drop the rows after ``step`` of the logs kept per step (metrics.jsonl, completions.jsonl):
        a resume from that step logs the later ones again."""
        for name in STEP_LOGS:
            rows = [row for row in self.read_jsonl(name) if row.get("step", 0) <= step]
            if rows or (self.path / name).exists():
                self.write_text(name, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))

    def losses(self) -> list[float]:
        """Training losses in logged order (metrics.jsonl rows that carry one)."""
        return [row["loss"] for row in self.read_jsonl(METRICS) if "loss" in row]

    # --- summary -------------------------------------------------------------------------------

    def init_summary(self, recipe_name: str) -> None:
        if not self.writer:
            return
        self.write_json(
            SUMMARY,
            {
                "recipe": recipe_name,
                "status": "running",
                "created": datetime.now().isoformat(timespec="seconds"),
                "stages": {s: {"status": "pending"} for s in STAGES},
            },
        )

    def summary(self) -> dict:
        return self.read_json(SUMMARY)

    def set_stage(self, stage: str, status: str, **figures: Any) -> None:
        if not self.writer:
            return
        summary = self.summary()
        entry = summary["stages"].setdefault(stage, {})
        now = time.time()
        if status == "running":
            entry["started"] = now
        elif "started" in entry:
            entry["seconds"] = round(now - entry["started"], 2)
        entry["status"] = status
        entry.update(figures)
        self.write_json(SUMMARY, summary)

    def set_status(self, status: str, **figures: Any) -> None:
        self.record(status=status, **figures)

    def record(self, **figures: Any) -> None:
        """Top-level summary.json entries (the status, times, the distributed launch)."""
        if not self.writer:
            return
        summary = self.summary()
        summary.update(figures)
        self.write_json(SUMMARY, summary)


def environment_report(device: str) -> dict:
    """Versions, platform and device; never tokens or secrets."""
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("vlmtune", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "accelerate"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": device,
        "packages": packages,
        "argv": sys.argv,
    }
