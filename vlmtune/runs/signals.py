"""Stopping by signal: Ctrl-C stops now; SIGTERM and SIGHUP save first when training allows it.

Schedulers (Slurm, Kubernetes, spot instances) send SIGTERM some seconds before they kill, and an
ssh connection that drops sends SIGHUP; Python's default for both is to die on the spot, leaving
summary.json `running` forever. Inside ``stop_on_signals()`` every one of them raises
``Interrupted`` (a KeyboardInterrupt) in the main thread, so the run is marked `interrupted`.

Inside ``graceful()`` (the training loop), SIGTERM and SIGHUP only ask for a stop: the trainer
finishes the step in progress, saves a complete checkpoint and then stops (``stop_now``), so a
resume continues from that step instead of the last periodic checkpoint. A repeated SIGTERM/SIGHUP
changes nothing (under torchrun a worker may get the scheduler's and the agent's forwarded copy); a
Ctrl-C stops at once. A signal that arrives while the run records its status (inside
``deferred()``) is held until the write is done, so a second Ctrl-C never leaves summary.json
half-updated.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
GRACEFUL = (signal.SIGTERM, signal.SIGHUP)  # the ones a scheduler or a dropped connection sends


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal; the process exits with 128 + the signal number, as shells expect.
    ``saved_step``: the step of the checkpoint saved on the way out (None: none was)."""

    def __init__(self, signum: int, saved_step: int | None = None, seconds_to_save: float | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.saved_step = saved_step
        self.seconds_to_save = seconds_to_save

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_deferring = 0
_pending: list[int] = []
_graceful = 0
_requested: list[tuple[int, float]] = []  # (signal, when) asked for a stop at the next step boundary


def _raise(signum: int, frame) -> None:
    if _deferring:
        _pending.append(signum)
        return
    if _graceful and signum in GRACEFUL:
        if not _requested:  # a repeat (torchrun forwarding the one a scheduler also sent us) changes nothing
            _requested.append((signum, time.monotonic()))
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted while inside. A signal the shell told us to ignore
    (SIGINT of a background job, SIGHUP under nohup) stays ignored."""
    previous = {s: signal.getsignal(s) for s in HANDLED}
    for sig in HANDLED:
        if previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def graceful() -> Iterator[None]:
    """The training loop: SIGTERM/SIGHUP ask for a stop (``stop_requested``) rather than raising. One asked
    for and not acted on when the block ends (it came during the final save) raises then."""
    global _graceful
    _graceful += 1
    try:
        yield
    finally:
        _graceful -= 1
        asked = _requested[:1]
        if not _graceful:
            _requested.clear()
    if not _graceful and asked:
        raise Interrupted(asked[0][0])


def stop_requested() -> int | None:
    """The signal that asked for a stop at the next step boundary, if one did."""
    return _requested[0][0] if _requested else None


def stop_now(signum: int, saved_step: int | None) -> None:
    """The checkpoint is saved: stop, saying which step it holds and how long it took since the signal."""
    asked = _requested[0][1] if _requested else None
    _requested.clear()
    took = round(time.monotonic() - asked, 2) if asked is not None else None
    raise Interrupted(signum, saved_step=saved_step, seconds_to_save=took)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold signals until the block is done, then raise for the first one that came."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1
    if not _deferring and _pending:
        signum = _pending[0]
        _pending.clear()
        raise Interrupted(signum)
