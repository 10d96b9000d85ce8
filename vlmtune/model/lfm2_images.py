"""LFM2-VL's image processor without torchvision (transformers 5.23 has only a torchvision one).

The same steps as transformers' Lfm2VlImageProcessor, on PIL/NumPy (transformers' PilBackend), with its
arithmetic in vlmtune.model.image_tokens (lfm2_layout): an image within its token budget (times the
tolerance) is smart-resized whole; a larger one is resized onto its grid of square tiles, cut row by row, and
followed by its smart-resized thumbnail. Each crop is cut into encoder patches (rows of patch * patch * 3
values, channels last, as the SigLIP2 tower reads them) and padded with zero rows to max_num_patches, with
pixel_attention_mask marking the real rows and spatial_shapes the crop's patch grid. Crops, their order,
their patch grids and so the prompt's tokens are the torchvision processor's; pixel values differ by
resampling (PIL's antialiased bilinear filter against torchvision's). vlmtune.model.shims registers it for
LFM2-VL configs where torchvision is missing. Module level: standard library only (transformers loads lazily).
"""

from __future__ import annotations

from functools import cache

from vlmtune.model.image_tokens import lfm2_layout, lfm2_settings_of


@cache
def processor_class() -> type:
    """The PIL Lfm2VlImageProcessor, built on first use (its base class imports transformers' image stack).

    It carries transformers' class name: AutoImageProcessor finds a registered class by the name a saved
    folder gives, and saved folders (the released ones too) give that one."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, PILImageResampling

    class Lfm2VlImageProcessorPil(PilBackend):
        downsample_factor = 2
        do_image_splitting = True
        min_tiles = 2
        max_tiles = 10
        use_thumbnail = True
        min_image_tokens = 64
        max_image_tokens = 256
        encoder_patch_size = 16
        tile_size = 512
        max_pixels_tolerance = 2.0
        do_resize = True
        size = {"height": 512, "width": 512}
        resample = PILImageResampling.BILINEAR
        do_rescale = True
        rescale_factor = 1 / 255
        do_normalize = True
        do_pad = True
        return_row_col_info = False
        image_mean = IMAGENET_STANDARD_MEAN
        image_std = IMAGENET_STANDARD_STD
        do_convert_rgb = True
        model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]
        valid_kwargs = _kwargs_class()

        def _preprocess(self, images, resample, do_rescale, rescale_factor, do_normalize, image_mean, image_std,
                        return_tensors, do_pad=True, return_row_col_info=False, **kwargs):  # fmt: skip
            settings = _settings(self, kwargs)
            return _preprocess(self, images, settings, resample, (do_rescale, rescale_factor),
                               (do_normalize, image_mean, image_std), do_pad, return_row_col_info,
                               return_tensors)  # fmt: skip

    Lfm2VlImageProcessorPil.__name__ = Lfm2VlImageProcessorPil.__qualname__ = "Lfm2VlImageProcessor"
    return Lfm2VlImageProcessorPil


@cache
def _kwargs_class() -> type:
    from transformers.processing_utils import ImagesKwargs

    class Lfm2VlImageProcessorKwargs(ImagesKwargs, total=False):
        downsample_factor: int
        do_image_splitting: bool
        min_tiles: int
        max_tiles: int
        use_thumbnail: bool
        min_image_tokens: int
        max_image_tokens: int
        encoder_patch_size: int
        tile_size: int
        max_pixels_tolerance: float
        do_pad: bool
        return_row_col_info: bool

    return Lfm2VlImageProcessorKwargs


_SETTING_NAMES = ("downsample_factor", "do_image_splitting", "min_tiles", "max_tiles", "use_thumbnail",
                  "min_image_tokens", "max_image_tokens", "encoder_patch_size", "tile_size",
                  "max_pixels_tolerance")  # fmt: skip


def _settings(ip, kwargs):
    """The call's settings (its keyword arguments over the processor's own), as image_tokens reads them."""
    from types import SimpleNamespace

    values = {
        name: kwargs.get(name) if kwargs.get(name) is not None else getattr(ip, name)
        for name in _SETTING_NAMES
    }
    if values["do_image_splitting"] and values["min_tiles"] > values["max_tiles"]:
        raise ValueError("min_tiles must be less than or equal to max_tiles")
    return lfm2_settings_of(SimpleNamespace(**values))


def _preprocess(ip, images, s, resample, rescale, normalize, do_pad, row_col_info, return_tensors):
    import numpy as np
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import SizeDict

    most_patches = max(
        s.max_pixels // s.patch_size**2, (s.image_size // s.patch_size) ** 2 if s.tiling else 0
    )
    crops, rows_of, cols_of, sizes = [], [], [], []
    for image in images:  # channels first
        height, width = image.shape[-2:]
        rows, cols, thumb_h, thumb_w = lfm2_layout(width, height, s)
        if rows * cols == 1:
            crops.append(ip.resize(image, SizeDict(height=thumb_h, width=thumb_w), resample=resample))
        else:
            tile = s.image_size
            grid = ip.resize(image, SizeDict(height=rows * tile, width=cols * tile), resample=resample)
            crops.extend(grid[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
                         for r in range(rows) for c in range(cols))  # fmt: skip
            if s.thumbnail:
                crops.append(ip.resize(image, SizeDict(height=thumb_h, width=thumb_w), resample=resample))
        rows_of.append(rows)
        cols_of.append(cols)
        sizes.append([thumb_h, thumb_w])
    patches = [_patches(_scaled(ip, crop, rescale, normalize), s.patch_size) for crop in crops]
    shapes = [[crop.shape[-2] // s.patch_size, crop.shape[-1] // s.patch_size] for crop in crops]
    # Upstream pads to most_patches, and breaks (its padding goes negative) on a crop with more: a thumbnail
    # whose short side was held at one token (a very elongated image, or a budget of few tokens). Here the
    # call's longest crop sets the length instead; the tower reads only the rows the mask marks.
    length = max([most_patches, *(len(p) for p in patches)])
    masks = []
    if do_pad:
        for i, rows_of_patches in enumerate(patches):
            mask = np.zeros(length, dtype=np.int32)
            mask[: len(rows_of_patches)] = 1
            padding = np.zeros((length - len(rows_of_patches), rows_of_patches.shape[1]), np.float32)
            patches[i] = np.concatenate([rows_of_patches, padding])
            masks.append(mask)
    data = {"pixel_values": np.stack(patches) if do_pad else patches}
    if do_pad:
        data["pixel_attention_mask"] = np.stack(masks)
        data["spatial_shapes"] = np.array(shapes, dtype=np.int64)
    if row_col_info:
        data.update(image_rows=rows_of, image_cols=cols_of, image_sizes=sizes)
    return BatchFeature(data=data, tensor_type=return_tensors)


def _patches(image, patch: int):
    """(channels, height, width) -> (patches row by row, patch * patch * channels), channels last."""
    channels, height, width = image.shape
    grid = image.reshape(channels, height // patch, patch, width // patch, patch).transpose(1, 3, 2, 4, 0)
    return grid.reshape((height // patch) * (width // patch), -1)


def _scaled(ip, image, rescale, normalize):
    import numpy as np

    do_rescale, factor = rescale
    do_normalize, mean, std = normalize
    image = image.astype(np.float32)
    if do_rescale:
        image = ip.rescale(image, factor)
    if do_normalize:
        image = ip.normalize(image, mean, std)
    return image.astype(np.float32)
