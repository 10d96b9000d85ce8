"""SIGTERM is Ctrl-C: both stop a run the same way, and the status write that follows always finishes.

Schedulers (Slurm, Kubernetes) and `kill` send SIGTERM; Python's default for it is to die on the
spot, leaving summary.json `running` forever. Inside ``stop_on_signals()`` both signals raise
``Interrupted`` (a KeyboardInterrupt) in the main thread, so the run is marked `interrupted` like
after a Ctrl-C. A signal that arrives while the run records its status (inside ``deferred()``) is
held until the write is done, so a second Ctrl-C never leaves summary.json half-updated.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal; the process exits with 128 + the signal number, as shells expect."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_deferring = 0
_pending: list[int] = []


def _raise(signum: int, frame) -> None:
    if _deferring:
        _pending.append(signum)
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted while inside. A SIGINT the shell told us to ignore (a
    background job of a script) stays ignored."""
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
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done, then raise for the first one that came."""
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
