"""Collator, Qwen-specific: the image grid behind the image tokens, the length refusal, the alignment.

What every family's collator must do (answers only, vision and pad masked, the record's extra
inputs) is checked family by family in tests/test_family_training.py.
"""

from __future__ import annotations

import pytest

from vlmtune.data.collator import VisionCollator, align_expanded
from vlmtune.errors import DataError, ModelError
from vlmtune.model.families import get_family

from conftest import PIXEL_BUDGET, QWEN_FAMILIES, TEXT_ONLY, TWO_TURNS


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def collator(request, tiny_path):
    from vlmtune.model.processing import load_processor

    family = get_family(request.param)
    processor = load_processor(tiny_path(request.param), family, PIXEL_BUDGET)
    return VisionCollator(processor, family, max_length=512, train_on_responses_only=True)


def test_the_image_tokens_are_the_grid_of_the_images_they_stand_for(collator):
    import torch

    batch = collator([TWO_TURNS, TEXT_ONLY])
    ids = batch["input_ids"]
    convert = collator.tokenizer.convert_tokens_to_ids
    for token in ("<|vision_start|>", "<|vision_end|>"):
        assert int((ids == convert(token)).sum()) == 2, f"one {token} per image"
    # Both images were expanded into image tokens and their pixels reached the batch.
    assert batch["image_grid_thw"].shape[0] == 2
    n_image_tokens = int((ids == convert("<|image_pad|>")).sum())
    merge = collator.processor.image_processor.merge_size
    assert n_image_tokens == int(batch["image_grid_thw"].prod(dim=1).sum()) // merge**2
    assert torch.is_tensor(batch["pixel_values"])


def test_a_sample_over_max_length_is_refused_not_cut(collator):
    short = VisionCollator(collator.processor, collator.family, max_length=20, train_on_responses_only=True)
    with pytest.raises(DataError, match="sample 0 is .* tokens .* over train.max_length=20"):
        short([TWO_TURNS])


def test_alignment_maps_text_tokens_and_flags_inserted_vision_tokens():
    assert align_expanded([5, 9, 9, 9, 6, 7], [5, 9, 6, 7]) == [0, 1, None, None, 2, 3]
    with pytest.raises(ModelError, match="do not contain"):
        align_expanded([5, 6], [5, 8])
