"""Finding and reading a checkpoint before any weight is loaded: where it is, its config, the device.

Used by the load stage, by the commands that work without weights (data check, estimate-memory)
and by the post-training commands, so none of them imports a stage.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vlmtune.errors import ModelError
from vlmtune.paths import TINY_PREFIX


def resolve_model_path(name: str) -> str:
    """tiny:FAMILY -> the cached tiny checkpoint; a folder -> itself; anything else is a hub id."""
    if name.startswith(TINY_PREFIX):
        from vlmtune.model.tiny import tiny_model_path

        return str(tiny_model_path(name[len(TINY_PREFIX) :]))
    return name


def read_config(path: str, revision: str | None = None) -> Any:
    from transformers import AutoConfig

    local = Path(path)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(
            f"{path} has no config.json, so it is not a model checkpoint",
            hint="point model.name at the folder that holds config.json and the weights",
        )
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"cannot read the model config of {path!r}: {str(exc).splitlines()[0]}",
            hint="give a local checkpoint folder, a reachable hub id (log in with `hf auth login` for gated "
            "models), or tiny:FAMILY for an offline test model",
        ) from None


def detect(name: str, revision: str | None = None) -> tuple[str, Any]:
    """(path the weights come from, Family record) of a recipe's model.name."""
    from vlmtune.model.families import detect_family

    path = resolve_model_path(name)
    return path, detect_family(read_config(path, revision))


def choose_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "train.device is cuda but no CUDA device is visible", hint="use train.device: auto or cpu"
        )
    return requested


SMALL_MACHINE_CORES = 4  # cores per process at or under which `cpu_threads: auto` picks 1 thread


def cpu_threads(setting: int | str, device: str, world_size: int = 1) -> int | None:
    """The torch thread count a run on ``device`` should use; None: leave torch as it is.

    A CUDA run is never touched. ``auto`` keeps an OMP_NUM_THREADS the user (or torchrun) set, and
    on a machine of few cores per process picks 1 thread: on a shared 2-core machine torch's default
    (one thread per core) spends its time waiting for a core another process holds
    (docs/benchmarks.md has the measurement). 0 keeps torch's default; a number is used as given.
    """
    if device != "cpu" or setting == 0:
        return None
    if setting != "auto":
        return int(setting)
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None  # the user's (or torchrun's) choice; torch already read it
    cores = _usable_cores() // max(world_size, 1)
    return 1 if cores <= SMALL_MACHINE_CORES else None


def apply_cpu_threads(setting: int | str, device: str, world_size: int = 1) -> int | None:
    """Set torch's thread count as ``cpu_threads`` says; returns the count now in use on CPU (None on CUDA)."""
    import torch

    threads = cpu_threads(setting, device, world_size)
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads() if device == "cpu" else None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_memory(device: str) -> int | None:
    """Bytes free on the device now: CUDA's free memory, or the RAM available on CPU."""
    import torch

    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
