"""Gradient checkpointing reaches every transformer block: the blocks are found from the family
records, only the ones transformers leaves out change, and they then recompute in backward with the
same loss and gradients while keeping fewer tensors."""

from __future__ import annotations

import pytest
from test_family_training import LANGUAGE_BLOCKS, VISION_BLOCKS

from vlmtune.model.checkpointing import checkpoint_every_block, transformer_blocks
from vlmtune.model.families import family_names, get_family

from conftest import ONE_IMAGE, PIXEL_BUDGET, TWO_TURNS

NAMES = family_names()


def tiny_model(family: str, tiny_path):
    import torch
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_pretrained(tiny_path(family), dtype=torch.float32)


@pytest.mark.parametrize("family", NAMES)
def test_the_blocks_are_every_layer_of_both_towers_and_nothing_else(family: str, tiny_path):
    model = tiny_model(family, tiny_path)
    prefixes = VISION_BLOCKS[family] + LANGUAGE_BLOCKS[family]
    expected = {name for name, _ in model.named_modules() if any(
        name.startswith(p) and name[len(p):].isdigit() for p in prefixes)}  # fmt: skip
    assert {name for name, _ in transformer_blocks(model, get_family(family))} == expected


@pytest.mark.parametrize("family", NAMES)
def test_only_blocks_transformers_does_not_checkpoint_change(family: str, tiny_path):
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = tiny_model(family, tiny_path)
    before = {name: type(module) for name, module in model.named_modules()}
    weights = {name: p.clone() for name, p in model.state_dict().items()}
    changed = checkpoint_every_block(model, get_family(family))
    if family == "mllama":  # MllamaVisionEncoderLayer is a plain nn.Module (transformers 5.17-5.23)
        assert changed == [*(f"model.vision_model.transformer.layers.{i}" for i in range(2)),
                           "model.vision_model.global_transformer.layers.0"]  # fmt: skip
    else:
        assert changed == []
    for name, module in model.named_modules():
        assert type(module) is before[name] or name in changed
        if name in changed:
            assert isinstance(module, before[name]) and isinstance(module, GradientCheckpointingLayer)
            assert type(module).__name__ == before[name].__name__  # FSDP's wrap policies go by class name
    assert all(model.state_dict()[name].equal(value) for name, value in weights.items())
    assert checkpoint_every_block(model, get_family(family)) == [], "a second call changes nothing"


def loss_grads_and_saved_bytes(model, batch) -> tuple[float, dict, int]:
    """One forward and backward in training mode; the bytes autograd kept outside checkpoints."""
    import torch

    saved = 0

    def pack(tensor):
        nonlocal saved
        saved += tensor.numel() * tensor.element_size()
        return tensor

    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(**batch).loss
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, saved


def test_mllama_vision_layers_recompute_with_the_same_loss_and_gradients(tiny_path):
    import torch

    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.processing import load_processor

    family = get_family("mllama")
    processor = load_processor(tiny_path("mllama"), family, PIXEL_BUDGET)
    batch = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)(
        [TWO_TURNS, ONE_IMAGE]
    )

    plain_loss, plain_grads, plain_saved = loss_grads_and_saved_bytes(tiny_model("mllama", tiny_path), batch)
    wrapped = tiny_model("mllama", tiny_path)
    checkpoint_every_block(wrapped, family)
    loss, grads, saved = loss_grads_and_saved_bytes(wrapped, batch)

    assert loss == pytest.approx(plain_loss, rel=1e-6)
    assert grads.keys() == plain_grads.keys()
    vision = [name for name in grads if name.startswith("model.vision_model.transformer.layers.")]
    assert vision and all(grads[name].abs().sum() > 0 for name in vision)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7)
    # the three vision layers no longer keep their activations (4 tiles of patches each)
    assert saved < 0.8 * plain_saved
