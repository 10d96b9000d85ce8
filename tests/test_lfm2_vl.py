"""LFM2-VL's image processing without torchvision (vlmtune.model.lfm2_images): the resize, tiling and token
arithmetic is transformers' own, crops come out in its order and layout, and the prompt gets the tokens the
record counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from upstream import image_processing_module

from vlmtune.model.families import get_family
from vlmtune.model.image_tokens import (
    lfm2_grid,
    lfm2_settings_of,
    lfm2_smart_resize,
    lfm2_target_ratios,
    lfm2_too_large,
)

from conftest import PIXEL_BUDGET


@pytest.fixture(scope="module")
def upstream():
    """transformers 5.23's torchvision-only image_processing_lfm2_vl, imported with a stand-in for torchvision:
    its arithmetic and patch functions use torch and math alone (only the resizes it does not run need it)."""
    return image_processing_module("lfm2_vl")


SIZES = [(1, 1), (17, 300), (300, 17), (512, 512), (513, 512), (500, 700), (700, 500), (1000, 1000),
         (224, 1344), (1344, 224), (2000, 3000), (5000, 300), (90, 90), (768, 1024), (1024, 768), (40, 2000),
         (731, 731), (1536, 512), (64, 64), (1023, 2049)]  # fmt: skip
# (released defaults) and budgets/tiny settings: patch, downsample, tile, tiles, min/max tokens
SETTINGS = [dict(), dict(max_tiles=4, max_image_tokens=128), dict(encoder_patch_size=8, tile_size=32, max_tiles=4,
            min_image_tokens=4, max_image_tokens=16), dict(min_tiles=1, max_tiles=6, max_pixels_tolerance=1.0)]  # fmt: skip
RELEASED = dict(downsample_factor=2, do_image_splitting=True, min_tiles=2, max_tiles=10, use_thumbnail=True,
                min_image_tokens=64, max_image_tokens=256, encoder_patch_size=16, tile_size=512,
                max_pixels_tolerance=2.0)  # fmt: skip


@pytest.mark.parametrize("overrides", SETTINGS, ids=["released", "budget", "tiny", "one-tile-grids"])
def test_resize_split_and_grid_are_transformers_own(upstream, overrides):
    values = {**RELEASED, **overrides}
    s = lfm2_settings_of(SimpleNamespace(**values))
    theirs = object.__new__(
        upstream.Lfm2VlImageProcessor
    )  # methods only: its __init__ would need torchvision
    patch, down, tile = values["encoder_patch_size"], values["downsample_factor"], values["tile_size"]
    tokens = (values["min_image_tokens"], values["max_image_tokens"])
    assert lfm2_target_ratios(s.min_tiles, s.max_tiles) == tuple(
        theirs._target_ratios(s.min_tiles, s.max_tiles)
    )
    for height, width in SIZES:
        width_bar, height_bar = theirs.smart_resize(height, width, down, *tokens, patch)
        assert lfm2_smart_resize(height, width, s) == (height_bar, width_bar), (height, width)
        large = theirs._is_image_too_large(
            height, width, tokens[1], patch, down, values["max_pixels_tolerance"]
        )
        assert lfm2_too_large(height, width, s) == large, (height, width)
        cols, rows, *_ = theirs._get_grid_layout(height, width, s.min_tiles, s.max_tiles, tile)
        assert lfm2_grid(height, width, s) == (cols, rows), (height, width)


def test_patches_and_padding_are_transformers_own(upstream):
    """A crop becomes the rows of patches, channels last, and zero rows up to max_num_patches, as upstream's
    convert_image_to_patches and pad_along_first_dim make them."""
    import numpy as np
    import torch

    from vlmtune.model.lfm2_images import _patches

    crop = np.random.default_rng(0).standard_normal((3, 24, 40)).astype(np.float32)
    theirs = upstream.convert_image_to_patches(torch.from_numpy(crop)[None], 8)
    np.testing.assert_array_equal(_patches(crop, 8), theirs[0].numpy())
    padded, mask = upstream.pad_along_first_dim(theirs, 20)
    assert padded.shape == (1, 20, 192) and mask.tolist() == [1] * 15 + [0] * 5


def test_the_whole_preprocessing_is_transformers_own_given_the_same_resize(upstream, processor):
    """transformers' own _preprocess (its grouping by shape, tiling, thumbnail, patches, padding and reordering),
    run with PIL's resize in place of torchvision's, gives the port's output exactly: only the resampling
    filter differs between the two."""
    import numpy as np
    import torch
    from transformers.image_processing_backends import TorchvisionBackend

    ours = processor.image_processor

    class PilResize(TorchvisionBackend):  # after Lfm2VlImageProcessor in the MRO: what its super() calls
        def resize(self, image, size, resample=None, antialias=True, **kwargs):
            batch = [ours.resize(one.numpy(), size, resample=resample) for one in image]
            return torch.from_numpy(np.stack(batch))

        def rescale_and_normalize(self, images, do_rescale, factor, do_normalize, mean, std):
            mean, std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
            return (
                images.to(torch.float32) * factor - mean
            ) / std  # the port's order: rescale, then normalize

    probe = type("Probe", (upstream.Lfm2VlImageProcessor, PilResize), {})
    theirs = object.__new__(probe)  # methods only: its __init__ would need torchvision
    sizes = [(200, 90), (40, 40), (300, 300), (200, 90), (90, 200), (64, 64), (130, 30)]  # (width, height)
    images = [_image(w, h, (250, 10, 10), (10, 10, 250)) for w, h in sizes]
    mine = ours(images, return_tensors="pt", return_row_col_info=True)
    settings = {name: getattr(ours, name) for name in ("downsample_factor", "do_image_splitting", "min_tiles",
                "max_tiles", "use_thumbnail", "min_image_tokens", "max_image_tokens", "encoder_patch_size",
                "tile_size", "max_pixels_tolerance")}  # fmt: skip
    expected = theirs._preprocess(
        [torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous() for image in images],
        do_resize=True, resample=ours.resample, do_rescale=True, rescale_factor=ours.rescale_factor,
        do_normalize=True, image_mean=ours.image_mean, image_std=ours.image_std, do_pad=True,
        return_row_col_info=True, return_tensors="pt", disable_grouping=None, **settings,
    )  # fmt: skip
    assert set(mine.keys()) == set(expected.keys())
    for key in ("image_rows", "image_cols", "image_sizes"):
        assert torch.as_tensor(mine[key]).tolist() == torch.as_tensor(expected[key]).tolist(), key
    assert mine["image_rows"].tolist() != [1] * len(sizes), "some images were split into tiles"
    torch.testing.assert_close(mine["spatial_shapes"], expected["spatial_shapes"])
    torch.testing.assert_close(mine["pixel_attention_mask"], expected["pixel_attention_mask"].to(torch.int32))
    torch.testing.assert_close(mine["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def processor(tiny_path):
    from vlmtune.model.processing import load_processor

    return load_processor(tiny_path("lfm2_vl"), get_family("lfm2_vl"))  # the tiny checkpoint's own settings


def _image(width: int, height: int, left, right):
    from PIL import Image

    image = Image.new("RGB", (width, height), left)
    image.paste(Image.new("RGB", (width // 2, height), right), (width // 2, 0))
    return image


def test_tiles_come_row_by_row_then_the_thumbnail(processor):
    import torch

    ip = processor.image_processor
    tile = ip.tile_size  # 32 pixels, 8-pixel patches: 16 patches per tile
    out = ip(
        _image(6 * tile, 3 * tile, (255, 0, 0), (0, 0, 255)), return_tensors="pt", return_row_col_info=True
    )
    assert (out["image_rows"].tolist(), out["image_cols"].tolist()) == (
        [1],
        [2],
    )  # 2:1, within 4 tiles: one row of two
    pixels, mask, shapes = out["pixel_values"], out["pixel_attention_mask"], out["spatial_shapes"]
    most = max(ip.max_image_tokens * ip.downsample_factor**2, (tile // ip.encoder_patch_size) ** 2)
    assert tuple(pixels.shape) == (3, most, 3 * 8 * 8)
    # the thumbnail: 192 x 96 scaled by sqrt(192 * 96 / 4096) (16 tokens of 16 x 16 pixels), each side floored
    # to 16 pixels: 80 x 32, 10 x 4 patches
    assert shapes.tolist() == [[4, 4], [4, 4], [4, 10]] and out["image_sizes"].tolist() == [[32, 80]]
    assert mask.sum(dim=1).tolist() == [16, 16, 40] and pixels[0, 16:].eq(0).all()
    red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])  # (x / 255 - 0.5) / 0.5
    # left tile, right tile (channels last; PIL's filter blends the column at the colours' border)
    torch.testing.assert_close(pixels[0, :16].reshape(-1, 3).mean(dim=0), red, atol=0.02, rtol=0)
    torch.testing.assert_close(pixels[1, :16].reshape(-1, 3).mean(dim=0), blue, atol=0.02, rtol=0)
    thumbnail = pixels[2, :40].reshape(4, 10, 8, 8, 3)  # patch rows, patch cols, pixel rows, cols, channels
    # its left and right edges (within PIL's resampling of the float image)
    torch.testing.assert_close(thumbnail[:, 0].reshape(-1, 3).mean(dim=0), red, atol=0.02, rtol=0)
    torch.testing.assert_close(thumbnail[:, -1].reshape(-1, 3).mean(dim=0), blue, atol=0.02, rtol=0)
    small = ip(_image(40, 40, (9, 9, 9), (9, 9, 9)), return_tensors="pt", return_row_col_info=True)
    assert small["pixel_values"].shape[0] == 1 and small["image_rows"].tolist() == [
        1
    ]  # resized whole, no thumbnail
    # a 16 x 416 thumbnail (its short side held at one token): 104 patches, past the 64 upstream pads to (and
    # fails on); the crops are padded to the longest instead
    long = ip(_image(700, 16, (9, 9, 9), (9, 9, 9)), return_tensors="pt")
    assert (
        long["pixel_values"].shape[1] == 104 and long["pixel_attention_mask"].sum(dim=1).tolist()[-1] == 104
    )


def test_the_prompt_has_the_tokens_the_record_counts(processor):
    family = get_family("lfm2_vl")
    settings = family.image_settings(processor)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    markers = set()
    for width, height in [(40, 40), (200, 90), (300, 300), (90, 200), (16, 700), (64, 64)]:
        batch = processor(text=[text], images=[_image(width, height, (9, 9, 9), (200, 200, 200))])
        ids = batch["input_ids"][0]
        assert ids.count(image_id) == family.tokens_per_image(width, height, settings), (width, height)
        rows, cols = family.image_layout(width, height, settings)
        tokens = processor.tokenizer.convert_ids_to_tokens(ids)
        assert sum(t.startswith("<|img_row_") for t in tokens) == (rows * cols if rows * cols > 1 else 0)
        markers.update(t for t in tokens if t.startswith("<|img_row_"))
        assert set(batch.keys()) == {"input_ids", "attention_mask", "pixel_values", "pixel_attention_mask",
                                     "spatial_shapes"}  # fmt: skip
    assert (
        markers <= set(family.structural_tokens) and len(markers) >= 4
    )  # every marker is masked from the loss


def test_the_budget_lowers_tokens_and_tiles(processor):
    """PIXEL_BUDGET (112 x 112) holds 12 tiles of 32 pixels: the tiny checkpoint's 4 stay; a budget under two
    tiles turns splitting off, and the whole image's tokens follow the budget."""
    import copy

    from vlmtune.model.image_tokens import lfm2_budget

    ip = copy.deepcopy(processor.image_processor)
    lfm2_budget(ip, PIXEL_BUDGET)
    assert (ip.max_tiles, ip.do_image_splitting, ip.max_image_tokens) == (4, True, 16)
    lfm2_budget(ip, 32 * 32 + 1)
    assert (ip.do_image_splitting, ip.max_image_tokens) == (False, 4)
