"""`run` and `Popen` as in subprocess, with the CLI's command lines forked from a preloaded server.

`python -m vlmtune ...` and `python tests/faults.py ...` (with sys.executable) go to tests/forkserver.py,
one server per test process, started on first use; every other command line, and any call whose
environment changes what the server's libraries read at import, runs as a plain subprocess.
VLMTUNE_TEST_FORKSERVER=0 turns the server off (every call a plain process), to rule it out.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import forkserver

HERE = Path(__file__).resolve().parent
FAULTS = str(HERE / "faults.py")


class _Server:
    def __init__(self) -> None:
        folder = tempfile.mkdtemp(prefix="vlmtune-forkserver-")
        self.path = os.path.join(folder, "socket")
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "forkserver.py"), self.path],
            stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        line = self.process.stdout.readline()
        if not line.startswith("ready "):
            raise RuntimeError(f"the fork server did not start: {line!r}")
        self.env = json.loads(line[len("ready ") :])
        atexit.register(self.stop)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        try:
            os.unlink(self.path)
            os.rmdir(os.path.dirname(self.path))
        except OSError:
            pass


_server: _Server | None = None
_server_pid: int | None = None  # the server belongs to the process that started it (not to a fork of it)


def server() -> _Server:
    global _server, _server_pid
    if _server is None or _server_pid != os.getpid() or _server.process.poll() is not None:
        _server, _server_pid = _Server(), os.getpid()
    return _server


def forkable(cmd: list[str], env: dict[str, str]) -> list[str] | None:
    """The argv the server runs (after `python`), or None where a plain process is needed."""
    if os.environ.get("VLMTUNE_TEST_FORKSERVER", "1") == "0":
        return None
    cmd = [str(part) for part in cmd]
    if len(cmd) < 2 or cmd[0] != sys.executable:
        return None
    if cmd[1:3] == ["-m", "vlmtune"] or cmd[1] == FAULTS:
        argv = cmd[1:]
    else:
        return None
    if not forkserver.serves(env, **server().env):
        return None
    return argv


class ForkedProcess:
    """The part of subprocess.Popen the tests use, for a process the server forked."""

    def __init__(self, argv: list[str], cwd: str, env: dict[str, str], stdout: int | None, stderr: int | None,
                 text: bool) -> None:  # fmt: skip
        self.args = argv
        self.returncode: int | None = None
        self._text = text
        self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._conn.connect(server().path)
        ends, self._readers = self._pipes(stdout, stderr)
        payload = json.dumps({"argv": argv, "cwd": cwd, "env": env}).encode()
        socket.send_fds(self._conn, [forkserver.HEADER.pack(len(payload))], ends)
        self._conn.sendall(payload)
        for fd in ends:
            os.close(fd)
        self._buffer = b""
        self.pid = self._reply(None)["pid"]
        self.stdout = self._stream(self._readers.get("stdout"))
        self.stderr = self._stream(self._readers.get("stderr"))

    @staticmethod
    def _pipes(stdout: int | None, stderr: int | None) -> tuple[list[int], dict[str, int]]:
        ends = [os.open(os.devnull, os.O_RDONLY)]
        readers: dict[str, int] = {}
        for name, wanted in (("stdout", stdout), ("stderr", stderr)):
            if wanted == subprocess.PIPE:
                read, write = os.pipe()
                readers[name] = read
                ends.append(write)
            elif wanted == subprocess.DEVNULL:
                ends.append(os.open(os.devnull, os.O_WRONLY))
            else:  # inherit ours, as subprocess does
                ends.append(os.dup(1 if name == "stdout" else 2))
        return ends, readers

    def _stream(self, fd: int | None):
        if fd is None:
            return None
        return os.fdopen(fd, "r" if self._text else "rb", **({"errors": "replace"} if self._text else {}))

    def poll(self) -> int | None:
        try:
            return self.wait(timeout=0)
        except subprocess.TimeoutExpired:
            return None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            reply = self._reply(timeout)
            # No reply: the server itself died, taking its children's statuses with it.
            self.returncode = os.waitstatus_to_exitcode(reply["status"]) if reply else -signal.SIGKILL
            self.cpu_s = reply["cpu_s"] if reply else None
        return self.returncode

    def _reply(self, timeout: float | None) -> dict | None:
        """The server's next JSON line (None when it closed the connection)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([self._conn], [], [], left)
            if not readable:
                raise subprocess.TimeoutExpired(self.args, timeout)
            data = self._conn.recv(4096)
            if not data:
                return None
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return json.loads(line)

    def communicate(self, timeout: float | None = None) -> tuple:
        deadline = None if timeout is None else time.monotonic() + timeout
        outputs = self._read_all(deadline)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return outputs.get("stdout"), outputs.get("stderr")

    def _read_all(self, deadline: float | None) -> dict:
        chunks: dict[str, list[bytes]] = {name: [] for name in ("stdout", "stderr") if getattr(self, name)}
        selector = selectors.DefaultSelector()
        for name in chunks:
            selector.register(getattr(self, name).fileno(), selectors.EVENT_READ, name)
        while selector.get_map():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, 0)
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if data:
                    chunks[key.data].append(data)
                else:
                    selector.unregister(key.fd)
        outputs = {}
        for name, parts in chunks.items():
            data = b"".join(parts)
            outputs[name] = data.decode(errors="replace") if self._text else data
            getattr(self, name).close()
        return outputs

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.send_signal(signal.SIGKILL)


def Popen(cmd, *, cwd=None, env=None, stdout=None, stderr=None, text=False, **kwargs):  # noqa: N802
    """subprocess.Popen, or a forked process for the CLI's command lines."""
    environment = dict(os.environ if env is None else env)
    argv = forkable(list(cmd), environment) if not kwargs else None
    if argv is None:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=stdout, stderr=stderr, text=text, **kwargs)
    return ForkedProcess(argv, str(cwd or os.getcwd()), environment, stdout, stderr, text)


def run(cmd, *, cwd=None, env=None, capture_output=False, text=False, timeout=None, check=False, **kwargs):
    """subprocess.run, or a forked process for the CLI's command lines."""
    environment = dict(os.environ if env is None else env)
    argv = forkable(list(cmd), environment) if not kwargs else None
    if argv is None:
        return subprocess.run(cmd, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout,
                              check=check, **kwargs)  # fmt: skip
    pipe = subprocess.PIPE if capture_output else None
    process = ForkedProcess(argv, str(cwd or os.getcwd()), environment, pipe, pipe, text)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise subprocess.TimeoutExpired(cmd, timeout) from None
    result = subprocess.CompletedProcess(list(cmd), process.returncode, stdout, stderr)
    if check:
        result.check_returncode()
    return result
