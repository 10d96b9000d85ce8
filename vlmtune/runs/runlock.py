"""One process at a time per run folder: an advisory lock (flock) on RUN/.lock.

The kernel releases a flock when its process exits, however it exits (kill -9 included), so a lock
never outlives its holder and needs no clean-up; the pid and command written into the file are only
there to say who holds it. The file itself stays: removing it would let a second process lock a
new file while the first still holds the old one. A `.lock` that is a symbolic link (or anything but
a plain file) is refused, never followed: writing the holder into it would truncate its target.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vlmtune.errors import RunDirError
from vlmtune.runs import rundir


class RunInUse(RunDirError):
    """Another live process trains this run folder."""


@contextlib.contextmanager
def hold(run_path: Path) -> Iterator[None]:
    """Hold the run folder's lock for the block, or raise RunInUse naming the process that has it."""
    path = Path(run_path) / rundir.LOCK
    fd = _open(path)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunInUse(
                f"run {run_path} is in use by {_holder(path)}; two processes must never train one run folder",
                hint="wait for that process to end, or stop it (`kill PID` marks the run interrupted); "
                "its lock goes away with the process",
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(_me()).encode())
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _open(path: Path) -> int:
    """The lock file, opened without following a symbolic link; refused unless a plain file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise
        fd = None
    if fd is not None and stat.S_ISREG(os.fstat(fd).st_mode):
        return fd
    if fd is not None:
        os.close(fd)
    raise RunDirError(
        f"{path} is not a plain file ({'a symbolic link' if path.is_symlink() else 'something else'}); vlmtune "
        "writes who holds the run there and never follows a link, which would overwrite its target",
        hint=f"remove {path} (vlmtune creates it again as a plain file); nothing in the run depends on it",
    )


def _me() -> dict:
    command = " ".join(["vlmtune", *sys.argv[1:]])
    return {"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"process {info['pid']} (`{info['command']}`, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"
