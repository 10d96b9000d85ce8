"""Gradient checkpointing that reaches every transformer block, not only the ones transformers wraps.

transformers checkpoints only blocks that subclass its GradientCheckpointingLayer. A family whose
blocks are plain modules keeps every activation of every block whatever ``train.gradient_checkpointing``
says: Mllama's 32 + 8 vision encoder layers (transformers 5.17-5.23) held 28 of the 37 GB of an
11B QLoRA step on an H200 (docs/benchmarks.md). ``checkpoint_every_block`` gives such blocks the
same behaviour as transformers' own: they act on the flag ``gradient_checkpointing_enable()`` sets,
so the recipe's switch and the Trainer's call stay the only controls.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from vlmtune.model.families import Family, ends_with


def transformer_blocks(model: Any, family: Family) -> list[tuple[str, Any]]:
    """(name, module) of each transformer block: an element of a ModuleList that holds one of the
    family's attention projections (a vision merger list or a projector is no block), outside any
    block transformers already checkpoints (its sub-blocks are recomputed with it)."""
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer

    attention = family.vision_attention + family.language_attention
    inside_checkpointed: list[str] = []
    blocks = []
    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer):
            inside_checkpointed.append(f"{name}.")
        if not isinstance(module, nn.ModuleList) or any(name.startswith(p) for p in inside_checkpointed):
            continue
        for index, child in enumerate(module):
            if any(ends_with(inner, suffix) for inner, _ in child.named_modules() for suffix in attention):
                blocks.append((f"{name}.{index}", child))
    return blocks


@cache
def _checkpointable(cls: type) -> type:
    """``cls`` with transformers' checkpointing wrapper around its forward (one subclass per class)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return type(cls.__name__, (cls, GradientCheckpointingLayer), {"__module__": cls.__module__})


def checkpoint_every_block(model: Any, family: Family) -> list[str]:
    """Make the blocks gradient checkpointing does not reach checkpointable; return their names.

    Each such block's class becomes a subclass of itself and of GradientCheckpointingLayer: its
    weights, state dict and outputs are unchanged, and it recomputes its forward in backward exactly
    when transformers' own blocks do (``gradient_checkpointing_enable()``, the model training).
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    changed = []
    for name, block in transformer_blocks(model, family):
        if not isinstance(block, GradientCheckpointingLayer):
            block.__class__ = _checkpointable(type(block))
            changed.append(name)
    return changed
