"""Collator: labels on assistant tokens only; pad, every vision token and the prompt masked."""

from __future__ import annotations

import pytest

from vlmtune.collator import VisionCollator, align_expanded
from vlmtune.constants import IGNORE_INDEX
from vlmtune.data import Sample
from vlmtune.errors import DataError, ModelError
from vlmtune.families import get_family

from conftest import QWEN_FAMILIES, ROOT

RED = ROOT / "data" / "demo" / "images" / "000.png"
BLUE = ROOT / "data" / "demo" / "images" / "001.png"


def user(text: str, images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


TWO_IMAGES_MULTI_TURN = Sample(
    0,
    [
        user("How many images?", images=2),
        assistant("There are two."),
        user("Which is first?"),
        assistant("Red."),
    ],
    [str(RED), str(BLUE)],
)
TEXT_ONLY = Sample(1, [user("Hello"), assistant("Hi there.")], [])


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def collator(request, tiny_path):
    from vlmtune.processing import load_processor

    family = get_family(request.param)
    processor = load_processor(tiny_path(request.param), family, 12544)
    return VisionCollator(processor, family, max_length=512, train_on_responses_only=True)


def labelled_text(collator, batch, row: int) -> str:
    ids, labels = batch["input_ids"][row], batch["labels"][row]
    kept = [int(i) for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    return collator.tokenizer.decode(kept)


def test_only_assistant_answers_and_their_end_of_turn_are_trained(collator):
    batch = collator([TWO_IMAGES_MULTI_TURN, TEXT_ONLY])
    assert labelled_text(collator, batch, 0) == "There are two.<|im_end|>\nRed.<|im_end|>\n"
    assert labelled_text(collator, batch, 1) == "Hi there.<|im_end|>\n"


def test_labels_equal_input_ids_wherever_they_are_kept(collator):
    batch = collator([TWO_IMAGES_MULTI_TURN])
    kept = batch["labels"] != IGNORE_INDEX
    assert (batch["labels"][kept] == batch["input_ids"][kept]).all()


def test_pad_and_every_vision_token_are_masked(collator):
    import torch

    batch = collator([TWO_IMAGES_MULTI_TURN, TEXT_ONLY])
    ids, labels = batch["input_ids"], batch["labels"]
    convert = collator.tokenizer.convert_tokens_to_ids
    for token in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"):
        positions = ids == convert(token)
        assert positions.any(), f"{token} is in the batch"
        assert (labels[positions] == IGNORE_INDEX).all(), f"{token} is masked"
    assert (labels[batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert (batch["attention_mask"][1] == 0).any(), "the text-only row is padded"
    # Both images were expanded into image tokens and their pixels reached the batch.
    assert batch["image_grid_thw"].shape[0] == 2
    n_image_tokens = int((ids == convert("<|image_pad|>")).sum())
    merge = collator.processor.image_processor.merge_size
    assert n_image_tokens == int(batch["image_grid_thw"].prod(dim=1).sum()) // merge**2
    assert torch.is_tensor(batch["pixel_values"])


def test_family_extra_inputs_reach_the_batch(collator):
    batch = collator([TWO_IMAGES_MULTI_TURN])
    for key in collator.family.extra_inputs:
        assert key in batch


def test_training_on_every_token_still_masks_vision_and_pad(collator):
    everything = VisionCollator(
        collator.processor, collator.family, max_length=512, train_on_responses_only=False
    )
    batch = everything([TWO_IMAGES_MULTI_TURN, TEXT_ONLY])
    text = labelled_text(everything, batch, 0)
    assert "How many images?" in text and "There are two." in text
    assert "<|image_pad|>" not in text and "<|vision_start|>" not in text


def test_a_sample_over_max_length_is_refused_not_cut(collator):
    short = VisionCollator(collator.processor, collator.family, max_length=20, train_on_responses_only=True)
    with pytest.raises(DataError, match="sample 0 is .* tokens .* over train.max_length=20"):
        short([TWO_IMAGES_MULTI_TURN])


def test_alignment_maps_text_tokens_and_flags_inserted_vision_tokens():
    assert align_expanded([5, 9, 9, 9, 6, 7], [5, 9, 6, 7]) == [0, 1, None, None, 2, 3]
    with pytest.raises(ModelError, match="do not contain"):
        align_expanded([5, 6], [5, 8])
