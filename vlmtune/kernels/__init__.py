"""Triton kernels for the training hot paths, chosen per family through its record and used on CUDA only where measured faster.

Each kernel module holds a torch reference beside its kernel and an autograd.Function with a hand-written
backward; ``patching`` swaps them into a loaded model (``train.kernels``). Importing this package is
cheap: triton loads only when a kernel module is imported. On CPU the kernels run under the Triton
interpreter (``TRITON_INTERPRET=1``, set before the first import), which is how the tests check them.
"""

from __future__ import annotations

import importlib.util

from vlmtune.errors import ModelError


def triton_available() -> bool:
    """Is triton installed (it is on the dev and gpu extras; the kernels need it even on CPU)?"""
    return importlib.util.find_spec("triton") is not None


def require_triton() -> None:
    """Raise the user error for kernels asked for where triton is missing."""
    if not triton_available():
        raise ModelError(
            "train.kernels: auto picked Triton kernels for this CUDA run, but triton is not installed",
            hint="pip install 'vlmtune[gpu]' (triton), or set train.kernels: off",
        )
