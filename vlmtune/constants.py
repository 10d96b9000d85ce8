"""Numbers several modules rely on, each stated once (no heavy imports here)."""

from __future__ import annotations

IGNORE_INDEX = -100  # the label of a position the loss skips (PyTorch's and transformers' convention)
LOSS_CHUNK_BYTES = 64 * 2**20  # fp32 logits the supervised loss projects at once (the memory model counts it)
