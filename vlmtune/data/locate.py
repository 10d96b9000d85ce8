"""Where a recipe's data and local folders are, checked without reading a sample or loading a model.

`vlmtune validate` and `vlmtune train` call ``missing`` before any heavy import: a data file, a
save_to_disk folder, a split of that folder, an image root, a local model or adapter folder that is
not there is a refusal that needs no model, and so costs a second instead of the 20 s of imports
`data check` needs before it could say the same. Hub ids are left to the loaders (no network here).
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

from vlmtune.paths import TINY_PREFIX, written_as_path
from vlmtune.recipe import DataSection, ModelSection

SPLIT_FALLBACKS = {"validation": "test"}  # eval_split's default, and the split a set without it offers


def missing(data: DataSection, model: ModelSection | None = None) -> list[str]:
    """One line per local thing the recipe names that is not there (empty: all found)."""
    problems = []
    for key, value in (("data.train", data.train), ("data.eval", data.eval)):
        if value is not None:
            split = data.train_split if key == "data.train" else data.eval_split
            problems += _source_problems(
                key, value, split, "train_split" if key == "data.train" else "eval_split"
            )
    if data.image_root is not None and not Path(data.image_root).expanduser().is_dir():
        problems.append(f"data.image_root: folder not found: {data.image_root}")
    if model is not None:
        for key, value in (("model.name", model.name), ("model.adapter", model.adapter)):
            if (
                value
                and not value.startswith(TINY_PREFIX)
                and _looks_local(value)
                and not Path(value).exists()
            ):
                problems.append(f"{key}: folder not found: {value}")
    return problems


def _looks_local(value: str) -> bool:
    return Path(value).expanduser().is_absolute() or written_as_path(value)


def _source_problems(key: str, value: str, split: str, split_key: str) -> list[str]:
    path = Path(value).expanduser()
    if path.is_file():
        return []
    if path.is_dir():
        return _split_problems(key, path, split, split_key)
    if not _looks_local(value):
        return []  # a hub id: checked when it is read
    near = _near_files(path)
    return [f"{key}: data file not found: {value}" + (f"; did you mean {near}?" if near else "")]


def splits_of(folder: Path) -> list[str] | None:
    """The splits of a save_to_disk DatasetDict folder (None: a single Dataset, or not a dataset)."""
    index = folder / "dataset_dict.json"
    if not index.is_file():
        return None
    try:
        return list(json.loads(index.read_text(encoding="utf-8")).get("splits", []))
    except (OSError, ValueError, AttributeError):
        return None


def pick_split(split: str, available: list[str]) -> str | None:
    """``split`` when the set has it, else its fallback (validation -> test) when it has that; else None."""
    if split in available:
        return split
    fallback = SPLIT_FALLBACKS.get(split)
    return fallback if fallback in available else None


def _split_problems(key: str, folder: Path, split: str, split_key: str) -> list[str]:
    available = splits_of(folder)
    if available is None or pick_split(split, available) is not None:
        return []
    close = difflib.get_close_matches(split, available, n=1, cutoff=0.5)
    suggestion = f"; did you mean `{close[0]}`?" if close else ""
    return [
        f"data.{split_key}: {folder} has no split {split!r}; it has {', '.join(available)}{suggestion}"
        f" (set data.{split_key}, used for {key})"
    ]


def _near_files(path: Path) -> str | None:
    """A file of a close name in the same folder (train.jsonl for trian.jsonl)."""
    parent = path.parent
    if not parent.is_dir():
        return None
    try:
        names = [p.name for p in parent.iterdir()]
    except OSError:
        return None
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.75)
    return str(parent / close[0]) if close else None
