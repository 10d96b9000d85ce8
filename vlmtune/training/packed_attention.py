"""Attention that pays only each packed sample's own share (train.packing without flash attention).

With sdpa or eager, transformers isolates the samples of a packed row with a block-causal mask and
still computes the whole row: (row length)^2 scores per head, the blocks off the diagonal masked. On
a 2,048-token row of ten samples that is about ten times the work of the samples' own attention.
Flash attention's variable-length kernel pays only the samples' own; where it is not installed (a
CPU, a GPU without flash_attn) the language model's attention is switched to ``per_sample_sdpa``:
sdpa run on each sample's slice of queries, keys and values, with the diagonal block of the mask
transformers built for that sample (so whatever that mask holds inside a sample, a sliding window
included, is kept exactly). Blocks off the diagonal are all masked in a packed row, so the result
equals the masked sdpa over the whole row.

The sample lengths travel as a keyword argument of the model's forward (``SAMPLE_LENGTHS_KWARG``),
which every packing family hands down to its attention functions. They are a name of vlmtune's own,
not transformers' ``cu_seq_lens_q``: the Qwen-VL families also hand their forward's keywords to the
vision tower, whose flash path sets ``cu_seq_lens_q`` itself. Only the language model's config is
switched; the vision tower keeps its own attention and still sees each image on its own.
A batch without the lengths (evaluation, generation) gets plain sdpa with its mask.
"""

from __future__ import annotations

from typing import Any

import torch

SAMPLE_ATTENTION = "vlmtune_per_sample_sdpa"  # the name registered with transformers' AttentionInterface
SAMPLE_LENGTHS_KWARG = "vlmtune_sample_lengths"  # tokens of each sample of a packed row, a tuple of ints
FLASH_PREFIX = "flash_attention"  # flash_attention_2/3/4: variable-length already, kept as they are


def per_sample_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """sdpa over each sample of a packed row (batch 1, no cache); plain sdpa for any other batch."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = kwargs.pop(SAMPLE_LENGTHS_KWARG, None)
    if lengths is None or not _one_packed_row(query, key, lengths):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    kwargs.pop("is_causal", None)
    outputs, start = [], 0
    for length in lengths:
        end = start + length
        block = None if attention_mask is None else attention_mask[..., start:end, start:end]
        output, _ = sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            block,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,  # read only where the mask is None: then causal inside the sample
            **kwargs,
        )
        outputs.append(output)
        start = end
    return torch.cat(outputs, dim=1), None  # (batch, seq, heads, head_dim), as sdpa gives it


def _one_packed_row(query: torch.Tensor, key: torch.Tensor, lengths: tuple[int, ...]) -> bool:
    """The lengths describe this call's row: one row, queries and keys the same tokens, no cache."""
    return query.shape[0] == 1 and query.shape[2] == key.shape[2] == sum(lengths)


def register() -> None:
    """Make ``SAMPLE_ATTENTION`` known to transformers, its masks built as sdpa's (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(SAMPLE_ATTENTION, per_sample_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SAMPLE_ATTENTION, sdpa_mask)


def use_per_sample_attention(model: Any) -> str:
    """Switch the language model of ``model`` to per-sample sdpa unless it runs flash attention.

    Returns the language model's attention implementation after the switch (recorded by the run).
    """
    text_config = model.config.get_text_config()
    current = text_config._attn_implementation or "eager"
    if current.startswith(FLASH_PREFIX) or current == SAMPLE_ATTENTION:
        return current
    register()
    text_config._attn_implementation = SAMPLE_ATTENTION
    return SAMPLE_ATTENTION
