"""A Python with torch, transformers, peft and trl already imported, forking one fresh process per CLI call.

Importing those libraries costs about 6 s of CPU, and the suite starts the CLI in its own process a few
hundred times (a real process is what signals, locks, exit codes and kill -9 need). So each test worker
starts this server once; `spawn.run` and `spawn.Popen` hand it `python -m vlmtune ...` and
`python tests/faults.py ...` command lines, and it forks a child that sets up the argv, working
folder, environment and standard streams it was given and runs the command as `python` would: its own
pid, real signals, its exit status (negative when a signal killed it), atexit handlers and the
interpreter's exit. vlmtune itself is imported fresh in every child: only third-party libraries are
preloaded.

What a fork cannot give: environment variables the preloaded libraries read at import (thread counts,
Hugging Face and torch switches). `spawn` compares them with the server's and starts a plain process
when they differ, as it does for any other command line (`-X importtime`, `-c`, torchrun).

    python tests/forkserver.py SOCKET      # prints "ready" and its import-time environment once it accepts requests

Protocol, one request per connection: the client sends an 8-byte length with three file descriptors
(stdin, stdout, stderr) attached, then that many bytes of JSON {"argv", "cwd", "env"}; the server
answers one JSON line {"pid": N} after the fork and one {"status": S, "cpu_s": T} (os.waitstatus; its CPU
seconds) when the child ends. The server is single-threaded (forking a threaded process can leave a lock held in the child).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import sys

# What `vlmtune train` of a tiny model imports beyond vlmtune itself (measured with -X importtime): most of
# transformers is imported lazily, so its trainer and model modules are named, not just the package.
PRELOAD = (
    "torch", "transformers", "transformers.trainer", "transformers.training_args", "transformers.modeling_utils",
    "transformers.generation.utils", "transformers.image_processing_utils", "transformers.video_processing_utils",
    "transformers.models.auto.modeling_auto", "transformers.models.auto.processing_auto",
    "peft", "trl", "trl.trainer.sft_trainer", "trl.trainer.dpo_trainer", "trl.trainer.grpo_trainer", "datasets",
    "bitsandbytes", "safetensors.torch", "PIL.Image", "matplotlib.figure", "matplotlib.backends.backend_agg",
    "typer", "rich.console", "rich.progress", "rich.table", "pydantic", "yaml", "tabulate",
)  # fmt: skip
# Read by the preloaded libraries when they import (or by the OpenMP runtime when it loads): a child
# cannot change them, so a request that sets them differently goes to a plain process.
IMPORT_TIME_ENV = ("OMP_", "MKL_", "OPENBLAS_", "HF_", "TRANSFORMERS_", "TORCH", "PYTORCH_", "CUDA_",
                   "BNB_", "BITSANDBYTES", "TOKENIZERS_", "TRITON_", "PYTHON", "LD_", "KMP_")  # fmt: skip
HEADER = struct.Struct("!Q")


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_ENV)}


def serves(env: dict[str, str], before: dict[str, str], after: dict[str, str]) -> bool:
    """Whether a child with ``env`` behaves as a fresh process would: each import-time variable as the server
    had it when it imported (``before``), or as the libraries set it themselves while importing (``after``:
    torch sets TORCHINDUCTOR_CACHE_DIR, so a test process that imported torch has it too)."""
    asked = import_time_env(env)
    return all(asked.get(key) in (before.get(key), after.get(key)) for key in {*asked, *before})


def vision_language_models() -> list[str]:
    """The modeling and processing modules of every image-text model transformers knows (the tiny families')."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    names = []
    for model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        package = f"transformers.models.{model_type}"
        names += [f"{package}.modeling_{model_type}", f"{package}.processing_{model_type}"]
    return names


def serve(path: str) -> None:
    import importlib

    before = import_time_env(dict(os.environ))
    for name in (*PRELOAD, *vision_language_models()):
        with contextlib.suppress(Exception):  # a missing optional library: children import it themselves
            importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    print("ready", json.dumps({"before": before, "after": import_time_env(dict(os.environ))}), flush=True)
    children: dict[int, socket.socket] = {}
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while True:
        for _ in selector.select(timeout=0.05):
            conn, _ = listener.accept()
            pid = start_child(conn, listener)
            if pid is not None:
                children[pid] = conn
        reap(children)


def reap(children: dict[int, socket.socket]) -> None:
    while children:
        try:
            pid, status, usage = os.wait4(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is not None:
            with contextlib.suppress(OSError):  # the client gave up on it (a timeout)
                cpu = usage.ru_utime + usage.ru_stime
                conn.sendall(json.dumps({"status": status, "cpu_s": cpu}).encode() + b"\n")
            conn.close()


def receive(conn: socket.socket) -> tuple[dict, list[int]]:
    header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    (length,) = HEADER.unpack(header)
    payload = b""
    while len(payload) < length:
        chunk = conn.recv(length - len(payload))
        if not chunk:
            raise ConnectionError("request cut short")
        payload += chunk
    return json.loads(payload), fds


def start_child(conn: socket.socket, listener: socket.socket) -> int | None:
    try:
        request, fds = receive(conn)
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return None
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        listener.close()
        conn.close()
        become(request, fds)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
    return pid


def become(request: dict, fds: list[int]) -> None:
    """In the child: the process `python ARGV...` would have been, then exit as it would."""
    code = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        reseed()
        code = run(request["argv"])
    except SystemExit as stop:
        code = exit_code(stop)
    finally:
        finish(code)


def reseed() -> None:
    """A fresh interpreter seeds Python's and numpy's generators from the OS; forked children would all
    share the server's state."""
    import random

    random.seed()
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed()


def run(argv: list[str]) -> int:
    """`python -m MODULE ARGS` or `python SCRIPT ARGS`, as the interpreter runs them."""
    import runpy
    import traceback

    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path.insert(0, os.getcwd())
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        return exit_code(stop)
    except KeyboardInterrupt:
        traceback.print_exc()
        flush()
        # As CPython does for an uncaught Ctrl-C: die of the signal, so the parent sees -SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001 - the interpreter prints any uncaught error and exits 1
        traceback.print_exc()
        return 1
    return 0


def exit_code(stop: SystemExit) -> int:
    if stop.code is None:
        return 0
    if isinstance(stop.code, int):
        return stop.code
    print(stop.code, file=sys.stderr)
    return 1


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing left to write to
            stream.flush()


def finish(code: int) -> None:
    """The interpreter's own shutdown: wait for non-daemon threads, run atexit handlers, flush."""
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx calls first
        atexit._run_exitfuncs()
    finally:
        flush()
        os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
