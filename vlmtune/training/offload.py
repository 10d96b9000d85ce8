"""``train.offload_activations``: the tensors autograd saves for backward, kept in (pinned) host memory.

A saved-tensors hook around the training step: each saved activation is copied to host memory when the
forward saves it and copied back when the backward needs it (asynchronously from pinned memory on
CUDA). Under non-reentrant gradient checkpointing the checkpoint saves only each block's inputs, outside
its own hook, so those are what moves: the few large tensors that live for the whole step. Parameters
are left where they are (they stay on the device anyway), and so are small tensors.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

MIN_ELEMENTS = 1024  # smaller saved tensors are not worth a copy


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved activations to host memory and back; counts what it moved (``tensors``, ``bytes``)."""

    def __init__(self, pin_memory: bool):
        self.tensors = 0
        self.bytes = 0

        def pack(tensor: torch.Tensor) -> Any:
            if isinstance(tensor, torch.nn.Parameter) or tensor.numel() < MIN_ELEMENTS:
                return tensor
            self.tensors += 1
            self.bytes += tensor.numel() * tensor.element_size()
            if tensor.device.type == "cpu":
                return (tensor.device, tensor)  # already in host memory: counted, not copied
            host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=pin_memory)
            host.copy_(tensor, non_blocking=pin_memory)
            return (tensor.device, host)

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            device, tensor = packed
            return tensor.to(device, non_blocking=pin_memory)

        super().__init__(pack, unpack)


def activation_offload(enabled: bool) -> AbstractContextManager:
    """The context a training step runs in: HostOffload (pinned when CUDA is there) or nothing."""
    if not enabled:
        return nullcontext()
    return HostOffload(pin_memory=torch.cuda.is_available())
