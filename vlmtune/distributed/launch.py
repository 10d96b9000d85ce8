"""Who this process is under torchrun or `accelerate launch`, its process group, and what ranks agree on.

vlmtune has no launcher of its own. torchrun and `accelerate launch` start one process per device
and tell each its place through WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; a plain
`vlmtune train` is a world of one and nothing here does anything.

Rank 0 is the writer: it names the run folder, pre-flights the data, writes every artifact,
logs and draws the progress bar. The other ranks train and learn what rank 0 decided through
the process group (``from_writer``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from vlmtune.errors import VlmtuneError
from vlmtune.recipe import DistributedSection

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the launch."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def writer(self) -> bool:
        """The one process that writes the run folder, logs and draws progress (global rank 0)."""
        return self.rank == 0

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


def ranks() -> Ranks:
    """This process's place, from the variables torchrun and accelerate launch set (a world of one without)."""
    world = _int_env("WORLD_SIZE", 1)
    return Ranks(
        world_size=world,
        rank=_int_env("RANK", 0),
        local_rank=_int_env("LOCAL_RANK", 0),
        local_world_size=_int_env("LOCAL_WORLD_SIZE", world),
    )


def _int_env(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise VlmtuneError(
            f"environment variable {name}={value!r} is not a number",
            hint="launch with torchrun or accelerate launch, which set it, or unset it for one process",
        ) from None


# --- the process group ---------------------------------------------------------------------------


def start(device: str, section: DistributedSection) -> Ranks:
    """Join the launch's process group (gloo on CPU, nccl on CUDA) with the recipe's timeout.

    vlmtune creates the group itself, before the Trainer does, for two reasons: ranks must agree
    on the run folder before any model loads, and the Trainer drops ``ddp_timeout`` on CPU (gloo's
    30-minute default would apply: a stuck rank would hang a test for half an hour).
    """
    here = ranks()
    if not here.distributed:
        return here
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if device == "cuda":
            torch.cuda.set_device(here.local_rank)
            backend = "nccl"
        dist.init_process_group(backend, timeout=timedelta(seconds=section.timeout))
    return here


@contextlib.contextmanager
def session(device: str, section: DistributedSection) -> Iterator[Ranks]:
    """The process group for the length of a run (nothing for one process)."""
    here = start(device, section)
    try:
        yield here
    finally:
        if here.distributed:
            finish()


def finish() -> None:
    """Leave the process group (torch warns at exit when a group was never destroyed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def from_writer(compute: Callable[[], T]) -> T:
    """Rank 0 computes, every rank returns the same value; outside a launch, just ``compute()``.

    An error on rank 0 reaches every rank (a user error keeps its class, message and hint), so
    no rank is left waiting for a value that never comes.
    """
    if not _group_ready():
        return compute()
    import torch.distributed as dist

    box: list[Any] = [None]
    failure: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", compute())
        except BaseException as exc:  # passed on to the other ranks, then raised here as it is
            failure = exc
            box[0] = ("error", _portable(exc))
    dist.broadcast_object_list(box, src=0)
    if failure is not None:
        raise failure
    kind, value = box[0]
    if kind == "error":
        raise _rebuilt(value)
    return value


def _portable(exc: BaseException) -> tuple:
    if isinstance(exc, VlmtuneError):
        return (
            type(exc).__module__,
            type(exc).__qualname__,
            exc.message,
            exc.hint,
            getattr(exc, "problems", None),
        )
    return None, type(exc).__name__, str(exc), None, None


def _rebuilt(value: tuple) -> BaseException:
    module, name, message, hint, problems = value
    if module is not None:
        import importlib

        cls = getattr(importlib.import_module(module), name, VlmtuneError)
        error = cls.__new__(cls)
        VlmtuneError.__init__(error, message, hint)
        if problems is not None:
            error.problems = problems
        return error
    return RuntimeError(f"rank 0 failed ({name}: {message}); see rank 0's output")


class RankLost(VlmtuneError):
    """Another rank of the launch stopped (killed, out of memory, crashed): this one cannot go on."""


# What gloo and NCCL say, each in its own words, when the rank at the other end is gone.
_PEER_GONE = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "connection refused",
    "nccl communicator was aborted", "socket timeout", "timed out", "remote process exited",
)  # fmt: skip


def lost_peer(exc: BaseException, resume: str) -> RankLost | None:
    """A collective that failed because another rank is gone, said plainly (None: something else).

    torchrun prints its own summary of which rank failed; the surviving ranks otherwise each add a raw
    gloo/NCCL traceback that says only "Connection closed by peer". ``resume``: the command that resumes.
    """
    here = ranks()
    if (
        not here.distributed
        or isinstance(exc, (VlmtuneError, KeyboardInterrupt))
        or not isinstance(exc, Exception)
    ):
        return None
    text = str(exc).lower()
    kind = type(exc).__name__
    if not (kind == "DistBackendError" or any(words in text for words in _PEER_GONE)):
        return None
    first = str(exc).strip().splitlines()[0].split(". ")[0][:300] if str(exc).strip() else kind
    return RankLost(
        f"rank {here.rank} of {here.world_size} lost contact with the other ranks ({kind}: {first}): another rank "
        "stopped (killed, out of memory, or an error: the first error in the launch's output is the cause)",
        hint=f"fix what stopped that rank, then resume every rank together: {resume}",
    )


def barrier() -> None:
    if _group_ready():
        import torch.distributed as dist

        dist.barrier()


def local_device(device: str, here: Ranks) -> str:
    """Where this rank loads its copy of the model: its own GPU under a launch (device_map needs the index)."""
    return f"cuda:{here.local_rank}" if device == "cuda" and here.distributed else device
