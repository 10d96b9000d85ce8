"""Llama 4's image processing without torchvision (vlmtune.model.llama4_images): the canvas arithmetic is
transformers' own, the tiles come out in its order, and the prompt gets the tokens the model expects."""

from __future__ import annotations

import pytest
from upstream import image_processing_module

from vlmtune.model.families import get_family
from vlmtune.model.image_tokens import ImageSettings, llama4_canvas, llama4_resized

from conftest import PIXEL_BUDGET


@pytest.fixture(scope="module")
def upstream():
    """transformers 5.23's torchvision-only image_processing_llama4, imported with a stand-in for torchvision:
    its canvas functions use torch alone (only the resize and pad it does not run need torchvision)."""
    return image_processing_module("llama4")


SIZES = [(1, 1), (17, 300), (300, 17), (336, 336), (337, 336), (500, 700), (700, 500), (1000, 1000),
         (224, 1344), (1344, 224), (2000, 3000), (5000, 300), (90, 90), (672, 335)]  # fmt: skip


@pytest.mark.parametrize("max_tiles", [1, 4, 16])
def test_canvas_and_resize_are_transformers_own(upstream, max_tiles: int):
    import torch
    from transformers.image_utils import SizeDict

    tile = 336
    upstream.find_supported_resolutions.cache_clear()
    resolutions = upstream.find_supported_resolutions(max_tiles, SizeDict(height=tile, width=tile))
    possible = torch.tensor(resolutions)
    for height, width in SIZES:
        canvas = tuple(int(v) for v in upstream.get_best_fit((height, width), possible))
        assert llama4_canvas(height, width, max_tiles, tile) == canvas, (height, width)
        # _preprocess's target: never upscaled past one tile side, then fitted without distortion
        target = (min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1]))
        expected = upstream.get_max_res_without_distortion((height, width), target)
        assert llama4_resized(height, width, canvas, tile) == (max(expected[0], 1), max(expected[1], 1))


@pytest.fixture(scope="module")
def processor(tiny_path):
    from vlmtune.model.processing import load_processor

    return load_processor(tiny_path("llama4"), get_family("llama4"), PIXEL_BUDGET)


def _image(width: int, height: int, left, right):
    from PIL import Image

    image = Image.new("RGB", (width, height), left)
    image.paste(Image.new("RGB", (width // 2, height), right), (width // 2, 0))
    return image


def test_tiles_come_row_by_row_then_the_whole_image(processor):
    import torch

    ip = processor.image_processor
    tile = ip.size.height
    out = ip(_image(2 * tile, tile, (255, 0, 0), (0, 0, 255)), return_tensors="pt")  # one row of two tiles
    pixels = out["pixel_values"]
    assert tuple(pixels.shape) == (3, 3, tile, tile) and out["aspect_ratios"].tolist() == [[1, 2]]

    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])  # (x / 255 - 0.5) / 0.5
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), red)
    torch.testing.assert_close(pixels[1].mean(dim=(1, 2)), blue)
    whole = pixels[2].mean(dim=(1, 2))  # the global view holds both halves
    assert whole[0] > -0.2 and whole[2] > -0.2
    narrow = ip(_image(tile, tile // 2, (255, 255, 255), (255, 255, 255)), return_tensors="pt")[
        "pixel_values"
    ]
    assert tuple(narrow.shape) == (1, 3, tile, tile)  # one tile: no global view
    assert narrow[0, :, -1].eq(-1).all() and narrow[0, :, 0].eq(1).all()  # padded at the bottom with black


def test_the_prompt_has_the_tokens_the_record_counts(processor):
    family = get_family("llama4")
    settings = family.image_settings(processor)
    assert (
        isinstance(settings, ImageSettings) and settings.tokens_per_tile == 4
    )  # 56 px, 14 px patches, shuffled
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    for width, height in [(112, 56), (40, 40), (200, 90)]:
        batch = processor(text=[text], images=[_image(width, height, (9, 9, 9), (200, 200, 200))])
        ids = batch["input_ids"][0]
        patch = processor.tokenizer.convert_tokens_to_ids("<|patch|>")
        assert ids.count(patch) == family.tokens_per_image(width, height, settings)
        assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values"}  # aspect_ratios stays out


def test_the_load_stage_casts_pixels_to_the_towers_dtype_for_generation():
    """Llama 4's tower never casts pixel_values: float32 pixels (the PIL processor) against bfloat16 weights
    fail outside autocast, unless the load stage's cast (Family.cast_pixel_values) is there."""
    import torch
    from PIL import Image

    from vlmtune.recipe import ModelSection, QuantizationSection
    from vlmtune.stages import load
    from vlmtune.training.answer_eval import generate_answer

    loaded = load.load(ModelSection(name="tiny:llama4"), QuantizationSection(bits=None), PIXEL_BUDGET, "cpu")
    assert loaded.model.vision_model.patch_embedding.linear.weight.dtype == torch.bfloat16
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]}
    ]
    answer = generate_answer(loaded.model, loaded.processor, messages, [Image.new("RGB", (90, 60), "red")], 4)
    assert isinstance(answer, str)
    tower, pixels = (
        loaded.model.vision_model,
        torch.zeros(1, 3, 56, 56),
    )  # float32, as the PIL processor gives
    assert tower(pixels).last_hidden_state.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="dtype"):  # negative control: forward() skips the cast (a hook)
        tower.forward(pixels)
