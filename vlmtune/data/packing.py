"""Packing: whole samples into rows of at most a token budget, and one row as model inputs.

``pack`` is arithmetic over the pre-flight's exact lengths (image tokens included), done before
step 1: first-fit decreasing, ties broken by a seeded shuffle, so the rows are a function of the
lengths, the budget and the seed. A sample is never split and never dropped: one longer than the
budget is an error (the pre-flight has already applied train.max_length, which the budget is at
least).

``PackedCollator`` collates each sample of a row alone with the VisionCollator (its labels, its
pixels, its family's extra inputs) and lays them end to end: ids and labels along the sequence,
with the label at each sample's first position masked (nothing predicts it from the sample
before); per-token inputs (mm_token_type_ids) along the sequence; pixel inputs along the family's
image axis. ``sample_lengths`` and ``images_per_sample`` tell the trainer where each sample starts,
from which it builds the positions (vlmtune.training.packed). There is no attention mask: a packed
row has no padding, and a 2-D mask would hide the sample boundaries from transformers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import Sample
from vlmtune.errors import DataError
from vlmtune.model.families import Family

SAMPLE_LENGTHS = "sample_lengths"  # batch keys the trainer reads and the model never sees
IMAGES_PER_SAMPLE = "images_per_sample"
PACKING_KEYS = (SAMPLE_LENGTHS, IMAGES_PER_SAMPLE)


@dataclass(frozen=True)
class PackedRows:
    rows: list[list[int]]  # sample indices per row, in row order
    lengths: list[int]  # tokens per row
    budget: int

    @property
    def fill(self) -> float:
        """Real tokens over the tokens the rows could hold (1.0: every row full)."""
        return sum(self.lengths) / (self.budget * len(self.rows)) if self.rows else 0.0


def pack(lengths: list[int], budget: int, seed: int) -> PackedRows:
    """First-fit decreasing of samples (by ``lengths``) into rows of at most ``budget`` tokens."""
    too_long = [(i, n) for i, n in enumerate(lengths) if n > budget]
    if too_long:
        index, length = too_long[0]
        raise DataError(
            f"{len(too_long)} sample(s) are longer than the packing budget of {budget} tokens (sample at "
            f"position {index}: {length} tokens); packing never splits a sample",
            hint="raise train.max_tokens_per_batch to at least train.max_length",
        )
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)  # ties: a seeded order, not the data file's
    order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the shuffled order
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(budget - lengths[i])
    return PackedRows(rows, [budget - free for free in room], budget)


class PackedCollator:
    """Rows of samples -> one batch per row (a batch holds exactly one packed row)."""

    def __init__(self, collator: Any, family: Family):
        if family.packing is None:
            raise ValueError(f"{family.title} does not pack: {family.packing_refused}")
        self.collator = collator
        self.image_axis = family.packing.image_axis

    def __call__(self, row: list[Sample]) -> dict:
        return self.join([self.collator([sample]) for sample in row])

    def join(self, parts: list[dict]) -> dict:
        """Single-sample batches (batch size 1, no padding) -> one packed row."""
        import torch

        labels = []
        for part in parts:
            sample_labels = part["labels"].clone()
            sample_labels[:, 0] = IGNORE_INDEX
            labels.append(sample_labels)
        batch: dict[str, Any] = {
            "input_ids": torch.cat([p["input_ids"] for p in parts], dim=1),
            "labels": torch.cat(labels, dim=1),
        }
        for key in dict.fromkeys(k for p in parts for k in p):
            if key in ("input_ids", "labels", "attention_mask"):
                continue
            values = [p[key] for p in parts if key in p]
            if any(tuple(p[key].shape) == tuple(p["input_ids"].shape) for p in parts if key in p):
                batch[key] = torch.cat(values, dim=1)  # one value per token: along the sequence
            elif key == "batch_num_images":
                batch[key] = sum(values).reshape(1)
            else:
                batch[key] = pad_cat(values, self.image_axis)
        batch[SAMPLE_LENGTHS] = torch.tensor([p["input_ids"].shape[1] for p in parts])
        batch[IMAGES_PER_SAMPLE] = torch.tensor([images_in(p, self.image_axis) for p in parts])
        return batch


def images_in(batch: dict, image_axis: int) -> int:
    """Images of a one-sample batch: the rows of its image grid (Qwen), else the length of its pixel
    inputs' image axis (tiles, for a family that tiles an image: Idefics3, InternVL)."""
    if "image_grid_thw" in batch:
        return int(batch["image_grid_thw"].shape[0])
    if "pixel_values" in batch:
        return int(batch["pixel_values"].shape[image_axis])
    return 0


def pad_cat(tensors: list, axis: int) -> Any:
    """Concatenate along ``axis``, zero-padding every other axis to the largest (as a processor pads a batch)."""
    import torch
    import torch.nn.functional as F

    ndim = tensors[0].ndim
    largest = [max(t.shape[d] for t in tensors) for d in range(ndim)]
    padded = []
    for t in tensors:
        pad: list[int] = []
        for d in reversed(range(ndim)):
            pad += [0, 0 if d == axis else largest[d] - t.shape[d]]
        padded.append(F.pad(t, pad) if any(pad) else t)
    return torch.cat(padded, dim=axis)
