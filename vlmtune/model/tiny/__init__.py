"""Fabricate tiny random models of every family, offline, and cache them.

A tiny model is a real checkpoint folder (config.json, safetensors, tokenizer, processor files)
that the Auto classes reload: 64-wide text layers, 32-wide vision layers, a tokenizer trained
in-process. Tests, the demo and `model.name: tiny:FAMILY` recipes use them.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from vlmtune.model.families import Family, get_family

# Bump when a builder changes, so cached folders are rebuilt.
TINY_VERSION = 2


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune"))


def build_tiny(family_name: str, out_dir: str | Path) -> Path:
    """Write a tiny ``family_name`` model + processor into ``out_dir`` (created if missing)."""
    builder = tiny_builder(get_family(family_name))  # get_family: a clear error for an unknown name
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    builder(out)
    return out


def tiny_builder(family: Family) -> Callable[[Path], None]:
    """The function its record names ("module:function"), imported now: builders import transformers."""
    module_name, func_name = family.tiny_builder.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def tiny_model_path(family_name: str) -> Path:
    """The cached tiny model of a family, fabricated on first use."""
    target = cache_root() / "tiny" / f"{family_name}-v{TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written cache entry.
    staging = Path(tempfile.mkdtemp(prefix=f".{family_name}-", dir=target.parent))
    try:
        build_tiny(family_name, staging)
        try:
            staging.rename(target)
        except OSError:  # another process won the race; its folder is as good as ours
            shutil.rmtree(staging, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
