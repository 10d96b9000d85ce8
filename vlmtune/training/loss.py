"""Cross-entropy on the supervised positions only.

In VLM fine-tuning most positions are image tokens and prompt, masked out of the loss, yet a
model's own loss projects every position through lm_head (152k-262k wide). Here the hidden
states are computed once, only the positions whose next-token label is kept go through lm_head,
and they go in chunks whose logits are recomputed in backward, so the fp32 logits buffer is
bounded by ``chunk_bytes`` whatever the sequence length. The result equals the model's own loss
(mean over kept labels, or sum / num_items_in_batch under gradient accumulation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlmtune.constants import IGNORE_INDEX, LOSS_CHUNK_BYTES


@dataclass
class SupervisedLoss:
    loss: torch.Tensor
    correct: int  # argmax == label, for the token-accuracy metric
    count: int  # supervised positions in this batch


@dataclass
class Captured:
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def lm_head_input(lm_head: torch.nn.Module) -> Iterator[Captured]:
    """Capture the hidden states entering lm_head and let it project only the last position.

    The model runs its own forward (every family's input handling intact) but its logits shrink to
    one position; the loss is then computed from the captured states.
    """
    captured = Captured()

    def hook(module: torch.nn.Module, args: tuple) -> tuple:
        captured.hidden = args[0]
        # Fresh contiguous strides: a strided slice sends the CPU matmul through bmm, which materialises
        # a copy of the whole lm_head weight (about 2 GB for a 7B Qwen2-VL; 1 s a step on bench/packing.py's
        # model). ``[:, -1:].contiguous()`` is not enough for a batch of one row (a packed row): a tensor
        # with size-1 dimensions counts as contiguous whatever its strides, so it keeps the row's stride.
        last = args[0][:, -1].clone(memory_format=torch.contiguous_format).unsqueeze(1)
        return (last, *args[1:])

    handle = lm_head.register_forward_pre_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def logit_transform(config: Any) -> dict:
    """Softcapping / scaling the model (its whole config) applies to its logits (Gemma's
    final_logit_softcapping, Cohere's logit_scale where the family's forward applies it)."""
    from vlmtune.model.families import detect_family

    text_config = config.get_text_config()
    scale = getattr(text_config, "logit_scale", None) if detect_family(config).applies_logit_scale else None
    return {
        "softcap": getattr(text_config, "final_logit_softcapping", None),
        "scale": 1.0 if scale is None else scale,
    }


def supervised_cross_entropy(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    lm_head: torch.nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_bytes: int = LOSS_CHUNK_BYTES,
    softcap: float | None = None,
    scale: float = 1.0,
) -> SupervisedLoss:
    """Causal LM loss (position t predicts label t+1) over the kept labels only."""
    shifted = labels[:, 1:].to(hidden.device)
    keep = shifted != IGNORE_INDEX
    states = hidden[:, :-1][keep]  # (n_kept, hidden)
    targets = shifted[keep]
    vocab = lm_head.weight.shape[0]
    chunk = max(1, chunk_bytes // (4 * vocab))
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = 0
    for start in range(0, states.shape[0], chunk):
        part_loss, part_correct = checkpoint(
            _chunk_loss, states[start : start + chunk], targets[start : start + chunk], lm_head, softcap, scale,
            use_reentrant=False,
        )  # fmt: skip
        total = total + part_loss
        correct += int(part_correct)
    count = int(keep.sum())
    denominator = num_items_in_batch if num_items_in_batch is not None else max(count, 1)
    if states.shape[0] == 0:  # keep the graph connected so backward() works on an all-masked batch
        total = total + hidden.sum() * 0.0
    return SupervisedLoss(total / denominator, correct, count)


def _chunk_loss(
    states: torch.Tensor, targets: torch.Tensor, lm_head: torch.nn.Module, softcap: float | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = lm_head(states).float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    return F.cross_entropy(logits, targets, reduction="sum"), correct
