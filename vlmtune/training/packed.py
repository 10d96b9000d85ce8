"""A packed row's positions, and the epoch-seeded order of the packed rows (heaviest row first).

Isolation comes from the positions: transformers (masking_utils.find_packed_sequence_indices)
starts a new sequence wherever the text position does not follow the previous one, and builds a
block-causal mask from it (sdpa and eager; flash attention's variable-length path on a GPU reads
the same positions). That only happens with no 2-D attention mask and no KV cache, so a packed
batch has neither (the trainer passes use_cache=False). Each family's own positions are kept: a
Qwen-VL sample gets its multimodal RoPE rows from the model's own rope index over that sample
alone, under a text row that restarts at 0 (the 4-row layout [text; t; h; w] Qwen-VL reads).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from vlmtune.data.packing import IMAGES_PER_SAMPLE, SAMPLE_LENGTHS
from vlmtune.model.families import Family


def is_packed(batch: dict) -> bool:
    return SAMPLE_LENGTHS in batch


def packed_positions(causal_lm: Any, family: Family, batch: dict) -> torch.Tensor:
    """position_ids for a packed row: (1, seq), or (4, 1, seq) for a multimodal-RoPE family."""
    lengths = [int(n) for n in batch[SAMPLE_LENGTHS]]
    ids = batch["input_ids"]
    text = torch.cat([torch.arange(n, device=ids.device) for n in lengths]).view(1, -1)
    if family.packing is None or family.packing.rope_index is None:
        return text
    rope_index = _attribute(causal_lm, family.packing.rope_index)
    grids = batch.get("image_grid_thw")
    images = [int(n) for n in batch[IMAGES_PER_SAMPLE]]
    rows, start, image = [], 0, 0
    for length, count in zip(lengths, images, strict=True):
        sample_ids = ids[:, start : start + length]
        token_types = batch["mm_token_type_ids"][:, start : start + length]
        grid = grids[image : image + count] if count else None
        rope, _ = rope_index(
            sample_ids, token_types, image_grid_thw=grid, attention_mask=torch.ones_like(sample_ids)
        )
        rows.append(rope)
        start, image = start + length, image + count
    return torch.cat([text.unsqueeze(0), torch.cat(rows, dim=2).to(text.dtype)], dim=0)


def _attribute(root: Any, path: str) -> Any:
    for name in path.split("."):
        root = getattr(root, name)
    return root


class PackedRowSampler(torch.utils.data.Sampler):
    """The packed rows in an order drawn from (seed, epoch): a resume replays its epoch row for row.

    ``heaviest_first``: in the first epoch the row with the most tokens is moved to step 1, so an
    out-of-memory error comes at the start of a run, not hours into it.
    """

    def __init__(self, weights: list[int], seed: int, heaviest_first: bool):
        self.weights = weights
        self.seed = seed
        self.heaviest_first = heaviest_first
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.weights), generator=generator).tolist()
        if self.heaviest_first and self.epoch == 0 and order:
            return iter(heaviest_to_front(order, self.weights))
        return iter(order)

    def __len__(self) -> int:
        return len(self.weights)


def heaviest_to_front(order: list[int], weights: list[int]) -> list[int]:
    """``order`` with its heaviest index swapped into the first place (the rest keep their places)."""
    heaviest = max(range(len(order)), key=lambda k: weights[order[k]])
    order = list(order)
    order[0], order[heaviest] = order[heaviest], order[0]
    return order
