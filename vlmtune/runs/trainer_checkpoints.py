"""Training checkpoints (3-train/checkpoints/checkpoint-N): when one counts, and which one a resume takes.

The Trainer creates the folder first and fills it file by file, so a kill, a Ctrl-C or a full disk
in mid-save leaves a folder that looks like a checkpoint and is not one. A checkpoint therefore
counts only once vlmtune has written its completion marker, last, after the Trainer's files are
on disk; the marker lists every file with its size and a content hash (the whole of a small file, a
sample of a large one: ``fingerprint``), so a file changed in place, same size, is caught without
reading gigabytes. A resume takes the newest checkpoint whose marker is there and whose files still
match it, and names every newer one it skipped and why. A checkpoint saved after the training
collapsed (vlmtune.training.finite) is set aside: its marker says so and a resume passes it over.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from vlmtune.errors import RunDirError
from vlmtune.runs import rundir


class CheckpointError(RunDirError):
    """No usable checkpoint, or a checkpoint file that cannot be read."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str
    damaged: bool  # True: it was complete once and a file changed since; False: its save never finished


@dataclass
class Choice:
    """The checkpoint a resume starts from (None: from step 0) and the newer ones it passed over."""

    chosen: Checkpoint | None
    skipped: list[Skipped] = field(default_factory=list)


def step_of(path: Path) -> int | None:
    digits = path.name.removeprefix(rundir.CHECKPOINT_PREFIX)
    return int(digits) if path.name.startswith(rundir.CHECKPOINT_PREFIX) and digits.isdigit() else None


def all_checkpoints(folder: Path) -> list[Checkpoint]:
    """Every checkpoint-N folder, complete or not, oldest step first."""
    if not folder.is_dir():
        return []
    found = [Checkpoint(p, step) for p in folder.iterdir() if p.is_dir() and (step := step_of(p)) is not None]
    return sorted(found, key=lambda c: c.step)


# --- writing ------------------------------------------------------------------------------------


def mark_complete(path: Path, extra: dict | None = None) -> None:
    """Flush the checkpoint's files to disk, then write the marker that makes it count.

    ``extra``: state of vlmtune's own that the checkpoint carries (kept in the marker).
    """
    files, hashes = {}, {}
    # rglob: an FSDP checkpoint keeps its sharded weights and optimizer state in subfolders
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != rundir.CHECKPOINT_MARKER):
        _fsync(file)
        name = file.relative_to(path).as_posix()
        files[name] = file.stat().st_size
        hashes[name] = fingerprint(file)
    marker = {"step": step_of(path), "files": files, "hashes": hashes, **(extra or {})}
    rundir.write_json_atomic(path / rundir.CHECKPOINT_MARKER, marker)
    _fsync(path / rundir.CHECKPOINT_MARKER)
    _fsync(path)  # the directory entries


WHOLE_FILE = 1 << 20  # files up to 1 MiB are hashed whole
SAMPLES = 16  # a larger file: this many blocks spread over it, plus its first and last block
BLOCK = 64 << 10


def fingerprint(path: Path) -> str:
    """A BLAKE2b hash of a file's content: all of a small file, sampled blocks of a large one (about
    1 MiB read whatever the size, so a save of gigabytes stays as fast). The sampled hash catches
    a file replaced or rewritten, not a flipped byte between samples: the CRCs and headers that
    ``file_damage`` checks cover the rest."""
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    with path.open("rb") as f:
        if size <= WHOLE_FILE:
            digest.update(f.read())
        else:
            offsets = [0, size - BLOCK, *((size - BLOCK) * i // (SAMPLES + 1) for i in range(1, SAMPLES + 1))]
            for offset in offsets:
                f.seek(offset)
                digest.update(f.read(BLOCK))
    return digest.hexdigest()


def set_aside_from(folder: Path, step: int, reason: str) -> list[Path]:
    """Mark the complete checkpoints at ``step`` or later as not to be resumed from (their weights come
    from a collapsed run); the files stay for whoever wants to look."""
    marked = []
    for checkpoint in all_checkpoints(folder):
        file = checkpoint.path / rundir.CHECKPOINT_MARKER
        if checkpoint.step < step or not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        rundir.write_json_atomic(file, {**data, "set_aside": reason})
        marked.append(checkpoint.path)
    return marked


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rotate(folder: Path, keep: int | None, best_by: tuple[str, bool] | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints (all when None); remove the rest and every partial one.

    Only complete checkpoints count towards the limit, so an interrupted save never pushes the last
    good checkpoint out. ``best_by``: (metric key, greater is better): the best complete checkpoint by
    that metric (``best()``) is kept too, beside the newest ones.
    """
    complete, partial = [], []
    for checkpoint in all_checkpoints(folder):
        (complete if _counts(checkpoint.path) else partial).append(checkpoint)
    kept = best(folder, *best_by) if best_by else None
    doomed = partial + [c for c in (complete[:-keep] if keep else []) if c != kept]
    for checkpoint in doomed:
        shutil.rmtree(checkpoint.path, ignore_errors=True)


def _counts(path: Path) -> bool:
    """Complete and not set aside (a set-aside checkpoint goes with the partial ones at the next rotation,
    which only a resumed run, continuing from an earlier one, reaches)."""
    file = path / rundir.CHECKPOINT_MARKER
    if not file.is_file():
        return False
    try:
        return not json.loads(file.read_text(encoding="utf-8")).get("set_aside")
    except (OSError, ValueError, AttributeError):
        return True  # a damaged marker: a resume names it; rotation keeps it as it keeps complete ones


def discard(path: Path) -> None:
    """Remove a stale folder (a partial save of this step) before the Trainer writes into it again."""
    if path.exists():
        shutil.rmtree(path)


# --- reading ------------------------------------------------------------------------------------


def marker(path: Path) -> dict:
    """The completion marker of a checkpoint that passed ``problem()``."""
    return json.loads((path / rundir.CHECKPOINT_MARKER).read_text(encoding="utf-8"))


def metric_of(path: Path, key: str) -> float | None:
    """The value of ``key`` measured at this checkpoint's step (kept in its marker), or None."""
    try:
        value = marker(path).get("metrics", {}).get(key)
    except (OSError, ValueError):
        return None
    return float(value) if isinstance(value, int | float) else None


def best(folder: Path, key: str, greater: bool) -> Checkpoint | None:
    """The complete checkpoint with the best measured ``key`` (the earliest among equals), or None."""
    found = None
    for checkpoint in all_checkpoints(folder):
        if not (checkpoint.path / rundir.CHECKPOINT_MARKER).is_file():
            continue
        value = metric_of(checkpoint.path, key)
        if value is not None and (found is None or (value > found[1] if greater else value < found[1])):
            found = (checkpoint, value)
    return found[0] if found else None


def choose(folder: Path) -> Choice:
    """The newest complete checkpoint and the newer ones skipped, with their reasons."""
    skipped: list[Skipped] = []
    for checkpoint in reversed(all_checkpoints(folder)):
        found = problem(checkpoint.path)
        if found is None:
            return Choice(checkpoint, skipped)
        skipped.append(Skipped(checkpoint.path, *found))
    return Choice(None, skipped)


def problem(path: Path) -> tuple[str, bool] | None:
    """Why this checkpoint cannot be resumed from (and whether it is damaged, not just partial), or None."""
    marker = path / rundir.CHECKPOINT_MARKER
    if not marker.is_file():
        return "incomplete: its save was interrupted (no completion marker)", False
    try:
        data = json.loads(marker.read_text(encoding="utf-8"))
        files, hashes = data["files"], data.get("hashes", {})  # markers older than the hashes have none
        files.items(), hashes.get("")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return f"its completion marker {rundir.CHECKPOINT_MARKER} is damaged", True
    if data.get("set_aside"):
        return f"set aside: {data['set_aside']}", False
    for name, size in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing", True
        actual = file.stat().st_size
        if actual != size:
            return f"{name} is {actual:,} bytes; it had {size:,} when saved", True
        damage = file_damage(file)
        if damage:
            return f"{name} is damaged ({damage})", True
        if name in hashes and fingerprint(file) != hashes[name]:
            return f"{name} is damaged (its content changed since it was saved)", True
    return None


def file_damage(path: Path) -> str | None:
    """A cheap integrity check by kind of file: JSON parses, torch's zip archives pass their CRCs,
    a safetensors header covers the file exactly. None when the file looks whole."""
    suffix = path.suffix
    try:
        if suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif suffix in (".pt", ".pth", ".bin"):  # torch.save writes zip archives with CRCs
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad is not None:
                return f"member {bad} fails its checksum"
        elif suffix == ".safetensors":
            return _safetensors_damage(path)
    except (OSError, UnicodeDecodeError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _safetensors_damage(path: Path) -> str | None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than its header"
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            return "its header runs past the end of the file"
        header = json.loads(f.read(length))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + length + end != size:
        return f"its tensors need {8 + length + end:,} bytes, the file has {size:,}"
    return None
