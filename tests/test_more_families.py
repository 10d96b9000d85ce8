"""The later families of issue 25 that need more than a record: what each one's forward computes, and the
refusals of what this machine cannot serve."""

from __future__ import annotations

import pytest
import torch

from vlmtune.errors import ModelError
from vlmtune.model.families import get_family

from conftest import ONE_IMAGE, PIXEL_BUDGET, TWO_TURNS


@pytest.fixture(scope="module")
def aya(tiny_path):
    from transformers import AutoModelForImageTextToText

    from vlmtune.data.collator import VisionCollator
    from vlmtune.model.processing import load_processor

    family = get_family("aya_vision")
    path = tiny_path("aya_vision")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    processor = load_processor(path, family, PIXEL_BUDGET)
    batch = VisionCollator(processor, family, max_length=None, train_on_responses_only=True)(
        [TWO_TURNS, ONE_IMAGE]
    )
    return model, batch


def supervised(model, batch, scale: float) -> torch.Tensor:
    from vlmtune.training.loss import lm_head_input, supervised_cross_entropy

    lm_head = model.get_output_embeddings()
    with torch.no_grad(), lm_head_input(lm_head) as captured:
        model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
    return supervised_cross_entropy(captured.hidden, batch["labels"], lm_head, scale=scale).loss


def test_aya_vision_loss_leaves_the_cohere2_logit_scale_out_as_its_forward_does(aya):
    """Aya Vision keeps Cohere2's config (logit_scale 0.0625 in the tiny model) but projects unscaled: the
    record says so, and only the unscaled loss is the model's own (the scaled one, the negative control, is not)."""
    from vlmtune.training.loss import logit_transform

    model, batch = aya
    scale = model.config.get_text_config().logit_scale
    assert scale == 0.0625 and logit_transform(model.config)["scale"] == 1.0
    with torch.no_grad():
        own = model(**batch, use_cache=False).loss
    torch.testing.assert_close(supervised(model, batch, 1.0), own, rtol=1e-5, atol=1e-6)
    assert abs(supervised(model, batch, scale).item() - own.item()) > 0.1


def test_aya_vision_grpo_scores_what_the_forward_computes_or_refuses(aya):
    """TRL's fused lm_head scales by the config's logit_scale: the GRPO stage makes the config say what the
    forward does, and refuses full fine-tuning with a reference model (reloaded from the checkpoint, scaled)."""
    import copy

    from vlmtune.stages.grpo import logits_as_the_forward_computes

    model = copy.deepcopy(aya[0])
    family = get_family("aya_vision")
    with pytest.raises(ModelError, match="grpo.beta > 0") as info:
        logits_as_the_forward_computes(model, family, beta=0.04)
    assert "train LoRA" in info.value.hint
    logits_as_the_forward_computes(model, family, beta=0.0)
    assert model.config.get_text_config().logit_scale == 1.0
    other = copy.deepcopy(aya[0])  # a family that applies its scale keeps it
    logits_as_the_forward_computes(other, get_family("qwen2_vl"), beta=0.04)
    assert other.config.get_text_config().logit_scale == 0.0625


def test_minicpm_processor_renders_images_without_a_video_processor(tiny_path):
    """MiniCPM-V 4.6's processor reads a (torchvision-only) video processor in its __init__; vlmtune's
    image-only class renders an image as the original does: id tag, the whole image, then its slices."""
    from PIL import Image

    from vlmtune.model.processing import load_processor

    family = get_family("minicpmv4_6")
    processor = load_processor(tiny_path("minicpmv4_6"), family)
    assert type(processor).__name__ == "MiniCPMV4_6Processor" and processor.video_slice_mode is False
    out = processor(text=["<|image_pad|>Hi"], images=[[Image.new("RGB", (112, 56))]])
    text = processor.tokenizer.decode(out["input_ids"][0])
    whole, slices = text.split("</image>")
    assert whole.startswith("<image_id>0</image_id><image>")
    rows, cols = 1, 2  # 112x56 over a 56x56 scale_resolution: two slices side by side
    assert slices.count("<slice>") == rows * cols and slices.endswith("Hi")
    settings = family.image_settings(processor)
    assert text.count("<|image_pad|>") == family.tokens_per_image(112, 56, settings)
    assert family.image_layout(112, 56, settings)[0] == (rows, cols)
