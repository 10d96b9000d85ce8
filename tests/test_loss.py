"""The supervised-positions loss equals the model's own loss, value and gradients, for every family."""

from __future__ import annotations

import pytest
import torch

from vlmtune.data.collator import VisionCollator
from vlmtune.data.preflight import read_split
from vlmtune.model.families import family_names, get_family
from vlmtune.recipe import DataSection
from vlmtune.training.loss import lm_head_input, logit_transform, supervised_cross_entropy

from conftest import PIXEL_BUDGET, ROOT


def family_batch(family_name: str, tiny_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.model.processing import load_processor

    family = get_family(family_name)
    path = tiny_path(family_name)
    processor = load_processor(path, family, PIXEL_BUDGET)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    samples = read_split(str(ROOT / "data" / "demo" / "train.jsonl"), DataSection(train="x")).samples[:3]
    batch = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)(samples)
    return model, batch


def ours(model, batch, **kwargs):
    lm_head = model.get_output_embeddings()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with lm_head_input(lm_head) as captured:
        outputs = model(**inputs, use_cache=False)
    assert outputs.logits.shape[1] == 1, "lm_head projected one position, not the whole sequence"
    transform = logit_transform(model.config)
    return supervised_cross_entropy(captured.hidden, batch["labels"], lm_head, **transform, **kwargs)


def grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family_name", sorted(family_names()))
def test_same_loss_and_gradients_as_the_models_own(family_name: str, tiny_path):
    model, batch = family_batch(family_name, tiny_path)
    reference = model(**batch, use_cache=False).loss
    reference.backward()
    expected = grads(model)
    model.zero_grad()

    # A small chunk budget forces several chunks, each recomputed in backward.
    result = ours(model, batch, chunk_bytes=4 * model.get_output_embeddings().weight.shape[0] * 3)
    result.loss.backward()
    actual = grads(model)

    torch.testing.assert_close(result.loss, reference, rtol=1e-5, atol=1e-6)
    assert result.count == int((batch["labels"][:, 1:] != -100).sum())
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_num_items_in_batch_sums_like_the_model_does(tiny_path):
    model, batch = family_batch("qwen2_vl", tiny_path)
    with torch.no_grad():
        reference = model(**batch, use_cache=False, num_items_in_batch=50).loss
        result = ours(model, batch, num_items_in_batch=50)
    torch.testing.assert_close(result.loss, reference, rtol=1e-5, atol=1e-6)


def test_an_all_masked_batch_gives_a_differentiable_zero(tiny_path):
    model, batch = family_batch("qwen2_vl", tiny_path)
    batch["labels"][:] = -100
    result = ours(model, batch)
    result.loss.backward()
    assert result.loss.item() == 0.0 and result.count == 0
