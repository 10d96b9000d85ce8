"""Is this string a local path or a hub id? One answer for recipes, data sources and models.

A recipe names models and datasets by hub id (``Qwen/Qwen2-VL-2B-Instruct``), by local path
(``../data/train.jsonl``, ``/models/qwen``) or as ``tiny:FAMILY``. What exists on disk is always
local; what does not exist is local only when it is written like a path.
"""

from __future__ import annotations

import re
from pathlib import Path

TINY_PREFIX = "tiny:"
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def written_as_path(value: str) -> bool:
    """Relative or absolute path syntax, or a data-file name: never a hub id."""
    return value.startswith((".", "/", "~")) or value.lower().endswith(DATA_SUFFIXES)


def is_hub_id(value: str) -> bool:
    """A hub id: ``name`` or ``owner/name``, not written as a path, not tiny:FAMILY, not on disk."""
    if value.startswith(TINY_PREFIX) or written_as_path(value) or Path(value).expanduser().exists():
        return False
    return HUB_ID.fullmatch(value) is not None
