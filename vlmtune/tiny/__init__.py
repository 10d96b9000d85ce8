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
from pathlib import Path

from vlmtune.families import get_family

# Bump when a builder changes, so cached folders are rebuilt.
TINY_VERSION = 2

# family name -> "module:function"; imported lazily because builders import transformers.
BUILDERS: dict[str, str] = {
    "qwen2_vl": "vlmtune.tiny.qwen:build_qwen2_vl",
    "qwen2_5_vl": "vlmtune.tiny.qwen:build_qwen2_5_vl",
    "qwen3_vl": "vlmtune.tiny.qwen3:build_qwen3_vl",
    "llava": "vlmtune.tiny.llava:build_llava",
    "llava_next": "vlmtune.tiny.llava:build_llava_next",
    "llava_onevision": "vlmtune.tiny.llava:build_llava_onevision",
    "pixtral": "vlmtune.tiny.pixtral:build_pixtral",
    "mistral3": "vlmtune.tiny.pixtral:build_mistral3",
    "gemma3": "vlmtune.tiny.gemma:build_gemma3",
    "mllama": "vlmtune.tiny.mllama:build_mllama",
    "idefics3": "vlmtune.tiny.idefics:build_idefics3",
    "smolvlm": "vlmtune.tiny.idefics:build_smolvlm",
    "paligemma": "vlmtune.tiny.gemma:build_paligemma",
    "internvl": "vlmtune.tiny.internvl:build_internvl",
}


def cache_root() -> Path:
    return Path(os.environ.get("VLMTUNE_CACHE", Path.home() / ".cache" / "vlmtune"))


def build_tiny(family_name: str, out_dir: str | Path) -> Path:
    """Write a tiny ``family_name`` model + processor into ``out_dir`` (created if missing)."""
    family = get_family(family_name)  # raises a clear error for an unknown name
    if family.name not in BUILDERS:
        from vlmtune.errors import ModelError

        raise ModelError(
            f"no tiny builder for {family.title} yet", hint=f"tiny models exist for: {', '.join(BUILDERS)}"
        )
    module_name, func_name = BUILDERS[family.name].split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    builder(out)
    return out


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
