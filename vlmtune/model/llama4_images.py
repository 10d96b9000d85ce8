"""Llama 4's image processor without torchvision (transformers 5.23 has only a torchvision one).

The same steps as transformers' Llama4ImageProcessor, on PIL/NumPy (transformers' PilBackend): the image is
resized without distortion into its best-fit canvas of tiles (vlmtune.model.image_tokens.llama4_canvas),
padded at the right and bottom, cut into tiles row by row, and, when there are several tiles, followed by
the whole image squeezed into one tile. Tiles, their order, the aspect ratios and so the prompt's tokens
are the torchvision processor's; pixel values differ by resampling (PIL's bilinear filter) and by precision
(float32 here, bfloat16 there: Llama 4's tower never casts its input, so the record's cast_pixel_values has
the load stage cast them to the tower's dtype). vlmtune.model.shims registers it for Llama 4
configs where torchvision is missing. Module level: standard library only (transformers loads lazily).
"""

from __future__ import annotations

from functools import cache

from vlmtune.model.image_tokens import llama4_canvas, llama4_resized


@cache
def processor_class() -> type:
    """The PIL Llama4ImageProcessor, built on first use (its base class imports transformers' image stack).

    It carries transformers' class name, Llama4ImageProcessor: AutoImageProcessor finds a registered class by
    the name a saved folder gives, and saved folders (the released ones too) give that one."""
    from transformers.image_processing_backends import PilBackend
    from transformers.image_utils import PILImageResampling

    class Llama4ImageProcessorPil(PilBackend):
        resample = PILImageResampling.BILINEAR
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.5, 0.5, 0.5]
        size = {"height": 336, "width": 336}
        do_resize = True
        do_rescale = True
        do_normalize = True
        do_convert_rgb = True
        max_patches = 16
        resize_to_max_canvas = False
        model_input_names = ["pixel_values"]
        valid_kwargs = _kwargs_class()

        def _preprocess(self, images, size, resample, do_rescale, rescale_factor, do_normalize, image_mean,
                        image_std, max_patches, return_tensors, resize_to_max_canvas=False, **kwargs):  # fmt: skip
            return _preprocess(self, images, size, resample, (do_rescale, rescale_factor),
                               (do_normalize, image_mean, image_std), max_patches, resize_to_max_canvas,
                               return_tensors)  # fmt: skip

    Llama4ImageProcessorPil.__name__ = Llama4ImageProcessorPil.__qualname__ = "Llama4ImageProcessor"
    return Llama4ImageProcessorPil


@cache
def _kwargs_class() -> type:
    from transformers.processing_utils import ImagesKwargs

    class Llama4ImageProcessorKwargs(ImagesKwargs, total=False):
        max_patches: int
        resize_to_max_canvas: bool

    return Llama4ImageProcessorKwargs


def _preprocess(ip, images, size, resample, rescale, normalize, max_patches, to_max_canvas, return_tensors):
    import numpy as np
    from transformers.image_processing_utils import BatchFeature
    from transformers.image_utils import SizeDict

    if to_max_canvas:
        raise ValueError("resize_to_max_canvas=True is not supported by vlmtune's Llama 4 image processor")
    tile = size.height
    pixel_values, aspect_ratios = [], []
    for image in images:  # channels first
        height, width = image.shape[-2:]
        canvas = llama4_canvas(height, width, max_patches, tile)
        new_h, new_w = llama4_resized(height, width, canvas, tile)
        resized = ip.resize(image, SizeDict(height=new_h, width=new_w), resample=resample)
        padded = ip.pad([resized], pad_size=SizeDict(height=canvas[0], width=canvas[1]), fill_value=0)[0]
        rows, cols = canvas[0] // tile, canvas[1] // tile
        tiles = _scaled(ip, padded, rescale, normalize)
        tiles = (
            tiles.reshape(-1, rows, tile, cols, tile)
            .transpose(1, 3, 0, 2, 4)
            .reshape(rows * cols, -1, tile, tile)
        )
        if rows * cols > 1:
            whole = ip.resize(image, SizeDict(height=tile, width=tile), resample=resample)
            tiles = np.concatenate([tiles, _scaled(ip, whole, rescale, normalize)[None]], axis=0)
        pixel_values.append(tiles)
        aspect_ratios.append([rows, cols])
    data = {
        "pixel_values": np.concatenate(pixel_values, axis=0) if return_tensors else pixel_values,
        "aspect_ratios": np.array(aspect_ratios, dtype=np.int64),
    }
    return BatchFeature(data=data, tensor_type=return_tensors)


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
