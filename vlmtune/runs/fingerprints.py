"""What the run's data were when it started, so a resume can tell when they changed.

A resume replays the data order from its seed: if the file behind ``data.train`` changed (48 samples
became 20), the resumed steps train on other samples than the run started with, and nothing would say
so. At the start of a run each local data source (``data.train``, ``data.eval``: a file, or a folder
such as a save_to_disk dataset) is fingerprinted into summary.json: its size and a hash of its content
(whole up to ``WHOLE_DATA`` bytes, sampled blocks beyond). A resume compares and refuses on a change.
Images that the samples name are not hashed (there may be millions); hub datasets are recorded by name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from vlmtune.errors import DataError
from vlmtune.recipe import DataSection
from vlmtune.runs.trainer_checkpoints import fingerprint

WHOLE_DATA = 256 << 20  # data files up to 256 MiB are hashed whole (a fraction of a second)
FOLDER_FILES = 10_000  # a folder's files fingerprinted, at most


def data_fingerprints(data: DataSection) -> dict[str, Any]:
    """{"train": {...}, "eval": {...}} for the sources the recipe names (local ones hashed)."""
    found = {}
    for split in ("train", "eval"):
        source = getattr(data, split)
        if source:
            found[split] = of_source(source)
    return found


def of_source(source: str) -> dict[str, Any]:
    path = Path(source)
    if path.is_file():
        return {"source": source, "bytes": path.stat().st_size, "hash": _file_hash(path)}
    if path.is_dir():
        digest = hashlib.blake2b(digest_size=16)
        files = sorted(p for p in path.rglob("*") if p.is_file())[:FOLDER_FILES]
        size = 0
        for file in files:
            size += file.stat().st_size
            digest.update(f"{file.relative_to(path).as_posix()}\0{fingerprint(file)}\0".encode())
        return {"source": source, "bytes": size, "files": len(files), "hash": digest.hexdigest()}
    return {"source": source, "hub": True}  # a hub dataset: its name is all there is to compare here


def _file_hash(path: Path) -> str:
    if path.stat().st_size > WHOLE_DATA:
        return fingerprint(path)
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def refuse_changed(recorded: dict[str, Any] | None, data: DataSection, run_path: Path) -> None:
    """A DataError naming every data source that differs from what the run started with."""
    if not recorded:
        return  # a run started before vlmtune recorded them
    now = data_fingerprints(data)
    changed = []
    for split, before in recorded.items():
        after = now.get(split)
        if (
            after is None
            or after.get("hash") != before.get("hash")
            or after.get("bytes") != before.get("bytes")
        ):
            was = (
                f"{before.get('bytes', '?'):,} bytes" if isinstance(before.get("bytes"), int) else "recorded"
            )
            is_now = (
                f"{after['bytes']:,} bytes" if after and isinstance(after.get("bytes"), int) else "missing"
            )
            changed.append(f"data.{split} ({before.get('source')}): {was} when the run started, {is_now} now")
    if changed:
        raise DataError(
            f"the data of run {run_path} changed since it started, so a resume would train its remaining steps "
            "on other samples than the ones it started with: " + "; ".join(changed),
            hint="put the data back as it was (the run's summary.json holds its fingerprints), or start a new run "
            "on the new data",
        )
