"""How many tokens an image becomes, per family: pure arithmetic, and the settings it reads.

The counting functions are re-derived from transformers 5.23's image processors (tests/test_families.py
checks them against the real processors at several sizes). The settings come from a loaded
processor (one reader per family, named by its Family record), or, when only a config is at hand
(estimate-memory on a hub id), from the config's keys. The pixel-budget writers apply
``data.max_image_pixels`` to a loaded image processor the way each family resizes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from types import SimpleNamespace
from typing import Any

DEFAULT_IMAGE_SIDE = 1024  # image side when the recipe sets no pixel budget


@dataclass(frozen=True)
class ImageSettings:
    """The processor settings that decide how many tokens an image becomes."""

    min_pixels: int | None = None
    max_pixels: int | None = None
    patch_size: int = 14
    merge_size: int = 2
    image_size: int | None = None  # fixed-resolution towers (CLIP, SigLIP); the tile side for tilers
    tokens_per_tile: int | None = None  # feature tokens of one tile / one fixed-size image
    max_tiles: int | None = None
    min_tiles: int = 1
    tiling: bool = False  # Idefics3 do_image_splitting, InternVL crop_to_patches
    longest_edge: int | None = None  # Pixtral, Idefics3: longest side after the first resize
    grid_pinpoints: tuple[tuple[int, int], ...] = ()  # LLaVA-NeXT/OneVision (height, width) canvases
    # LFM2-VL: an image is split only past max_pixels * max_pixels_tolerance, and a split one gets a thumbnail
    max_pixels_tolerance: float = 2.0
    thumbnail: bool = True


TokensPerImage = Callable[[int, int, ImageSettings], int]


TokensPerImage = Callable[[int, int, ImageSettings], int]


def _size(size: Any, key: str) -> Any:
    """A key of an image processor's size: a dict in saved configs, a SizeDict once loaded."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)


def _image_processor(processor: Any) -> Any:
    return getattr(processor, "image_processor", processor)


# --- image-token arithmetic -------------------------------------------------------------------


def _need(settings: ImageSettings, name: str) -> Any:
    value = getattr(settings, name)
    if not value:
        raise ValueError(f"ImageSettings.{name} is needed to count this family's image tokens")
    return value


def qwen_resized(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's smart_resize: sides rounded to ``factor``, area kept inside [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200, which Qwen processors refuse")
    h = round(height / factor) * factor  # may round to 0: then the min_pixels branch scales up
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_tokens(width: int, height: int, s: ImageSettings) -> int:
    factor = s.patch_size * s.merge_size
    h, w = qwen_resized(
        height, width, factor, s.min_pixels or factor * factor, s.max_pixels or 16384 * 28 * 28
    )
    return (h // factor) * (w // factor)


GLM_FRAMES = 2  # GLM-4.xV resizes a still image as two frames: its pixel limits count both


def glm4v_tokens(width: int, height: int, s: ImageSettings) -> int:
    """GLM-4.1V/4.6V's smart_resize: small sides scaled up to one cell, then Qwen's rounding with the
    area counted twice (the image is its own second frame)."""
    factor = s.patch_size * s.merge_size
    min_pixels, max_pixels = s.min_pixels or 112 * 112, s.max_pixels or 28 * 28 * 15000
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200, which GLM processors refuse")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if GLM_FRAMES * h * w > max_pixels:
        beta = math.sqrt(GLM_FRAMES * height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif GLM_FRAMES * h * w < min_pixels:
        beta = math.sqrt(min_pixels / (GLM_FRAMES * height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return (h // factor) * (w // factor)


def glm4v_budget(ip: Any, max_pixels: int) -> None:
    # The processor's longest_edge caps both frames' pixels: twice the image's own.
    size = dict(getattr(ip, "size", None) or {})
    factor = ip.patch_size * ip.merge_size
    size["longest_edge"] = min(size.get("longest_edge") or GLM_FRAMES * max_pixels, GLM_FRAMES * max_pixels)
    size["shortest_edge"] = min(size.get("shortest_edge") or factor * factor, size["longest_edge"])
    ip.size = size


def fixed_tokens(width: int, height: int, s: ImageSettings) -> int:
    """Llava-1.5, Gemma 3 (without pan-and-scan), PaliGemma: every image is resized to one size."""
    return _need(s, "tokens_per_tile")


def one_token(width: int, height: int, s: ImageSettings) -> int:
    """Mllama: one <|image|> text token; the tiles reach the text through cross-attention."""
    return 1


def select_best_resolution(
    height: int, width: int, pinpoints: tuple[tuple[int, int], ...]
) -> tuple[int, int]:
    """The (height, width) canvas that keeps most of the image and wastes least (LLaVA-NeXT anyres)."""
    best, best_effective, best_wasted = pinpoints[0], 0, math.inf
    for canvas_h, canvas_w in pinpoints:
        scale = min(canvas_w / width, canvas_h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = canvas_w * canvas_h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (canvas_h, canvas_w), effective, wasted
    return best


def _anyres_tokens(width: int, height: int, s: ImageSettings, max_tiles: int | None) -> int:
    """Base tile + the unpadded grid features + one newline per grid row (LLaVA-NeXT, OneVision)."""
    tile, per_tile = _need(s, "image_size"), _need(s, "tokens_per_tile")
    best_h, best_w = select_best_resolution(height, width, _need(s, "grid_pinpoints"))
    side = tile // s.patch_size
    rows, cols = side * (best_h // tile), side * (best_w // tile)
    if width / height > cols / rows:
        new_rows = int(round(height * (cols / width), 7))
        rows -= ((rows - new_rows) // 2) * 2
    else:
        new_cols = int(round(width * (rows / height), 7))
        cols -= ((cols - new_cols) // 2) * 2
    unpadded, newlines = rows * cols, rows
    if max_tiles is not None:  # OneVision's anyres_max_N pools a grid larger than N tiles
        ratio = math.sqrt(rows * cols / (max_tiles * side**2))
        if ratio > 1.1:
            unpadded, newlines = int(rows // ratio) * int(cols // ratio), int(rows // ratio)
    return unpadded + newlines + per_tile


def llava_next_tokens(width: int, height: int, s: ImageSettings) -> int:
    return _anyres_tokens(width, height, s, None)


def llava_onevision_tokens(width: int, height: int, s: ImageSettings) -> int:
    """For a single-image sample; in a multi-image sample each image is one base tile + 1."""
    return _anyres_tokens(width, height, s, s.max_tiles)


def pixtral_grid(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of (patch x merge) cells after fitting the longest edge."""
    edge = s.longest_edge or _need(s, "image_size")  # a config's image_size is the longest edge
    cell = s.patch_size * s.merge_size
    ratio = max(height / edge, width / edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return (height - 1) // cell + 1, (width - 1) // cell + 1


def pixtral_tokens(width: int, height: int, s: ImageSettings) -> int:
    """[IMG] tokens: rows x cols cells. The processor adds one [IMG_BREAK] per row (the last one is
    [IMG_END]) on top."""
    rows, cols = pixtral_grid(width, height, s)
    return rows * cols


IDEFICS3_MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE for Idefics3/SmolVLM


def idefics3_tiles(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """(rows, cols) of tiles; (0, 0) when the image fits one tile and is not split."""
    edge, tile = _need(s, "longest_edge"), _need(s, "image_size")
    # 1. longest edge scaled TO longest_edge (up or down), the other side kept even
    aspect = width / height
    if width >= height:
        width, height = edge, int(edge / aspect)
        height += height % 2
    else:
        height, width = edge, int(edge * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    if max(height, width) > IDEFICS3_MAX_SIDE:
        aspect = width / height
        if width >= height:
            width, height = IDEFICS3_MAX_SIDE, max(int(IDEFICS3_MAX_SIDE / aspect), 1)
        else:
            height, width = IDEFICS3_MAX_SIDE, max(int(IDEFICS3_MAX_SIDE * aspect), 1)
    # 2. both sides rounded up to whole tiles
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def idefics3_tokens(width: int, height: int, s: ImageSettings) -> int:
    """<image> tokens: one tile's worth per split tile plus the global image."""
    per_tile = _need(s, "tokens_per_tile")
    if not s.tiling:
        return per_tile
    rows, cols = idefics3_tiles(width, height, s)
    return per_tile * (rows * cols + 1)


def internvl_tiles(width: int, height: int, s: ImageSettings) -> int:
    """Tiles of the closest-aspect grid with min_tiles..max_tiles tiles, plus a thumbnail if > 1."""
    if not s.tiling or (s.max_tiles or 1) <= 1:
        return 1
    tile, most = _need(s, "image_size"), _need(s, "max_tiles")
    grids = sorted(
        ((cols, rows) for cols in range(1, most + 1) for rows in range(1, most + 1)
         if s.min_tiles <= cols * rows <= most),
        key=lambda grid: grid[0] * grid[1],
    )  # fmt: skip
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), math.inf
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    tiles = best[0] * best[1]
    return 1 + tiles if tiles > 1 else 1


def internvl_tokens(width: int, height: int, s: ImageSettings) -> int:
    return internvl_tiles(width, height, s) * _need(s, "tokens_per_tile")


def gemma4_resized(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """Gemma 4's aspect-preserving resize: the largest size with at most max_soft_tokens x pooling^2
    patches whose sides are whole (pooling x patch) cells; a side that rounds to 0 gets one cell."""
    per_tile, patch, pool = _need(s, "tokens_per_tile"), s.patch_size, s.merge_size
    max_patches = per_tile * pool * pool
    factor = math.sqrt(max_patches * patch * patch / (height * width))
    cell = pool * patch
    h, w = math.floor(factor * height / cell) * cell, math.floor(factor * width / cell) * cell
    if h == 0 and w == 0:
        raise ValueError(f"a {width}x{height} image resizes to 0x0 for Gemma 4")
    longest = (max_patches // pool**2) * cell
    if h == 0:
        h, w = cell, min(math.floor(width / height) * cell, longest)
    elif w == 0:
        w, h = cell, min(math.floor(height / width) * cell, longest)
    return h, w


def gemma4_tokens(width: int, height: int, s: ImageSettings) -> int:
    """Soft tokens: the resized image's patches pooled (pooling x pooling) into one token each."""
    h, w = gemma4_resized(height, width, s)
    return (h // s.patch_size) * (w // s.patch_size) // s.merge_size**2


GEMMA4_SOFT_TOKENS = (70, 140, 280, 560, 1120)  # the settings Gemma 4's image processor accepts


def _ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def minicpm_resized(height: float, width: float, s: ImageSettings, upscale: bool) -> tuple[int, int]:
    """MiniCPM-V's find_best_resize: an image over scale_resolution^2 pixels (or any, when upscaling) is
    brought to that area, aspect kept; each side then rounds to whole (patch x merge) cells."""
    side = _need(s, "image_size")
    if height * width > side * side or upscale:
        aspect = width / height
        height = int(side / math.sqrt(aspect))
        width = int(height * aspect)
    cell = s.patch_size * s.merge_size
    return _ensure_divide(height, cell), _ensure_divide(width, cell)


def minicpm_grid(width: int, height: int, s: ImageSettings) -> tuple[int, int] | None:
    """MiniCPM-V's slice grid (rows, cols): about area / scale_resolution^2 slices (at most max_tiles), the
    count and shape whose aspect is closest to the image's in log ratio; None: the image is not sliced."""
    if not s.tiling:
        return None
    side, most = _need(s, "image_size"), _need(s, "max_tiles")
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (side * side)), most)
    if multiple <= 1:
        return None
    best, least = (1, 1), math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > most:
            continue
        for rows in (r for r in range(1, count + 1) if count % r == 0):
            error = abs(log_ratio - math.log((count // rows) / rows))
            if error < least or (error == least and rows > best[0]):
                best, least = (rows, count // rows), error
    return best


def minicpm_layout(width: int, height: int, s: ImageSettings) -> tuple[tuple[int, int] | None, int, int]:
    """(grid, tokens of the whole image, tokens of each slice): what decides MiniCPM-V's image text."""
    grid = minicpm_grid(width, height, s)
    per_token = s.merge_size**2
    h, w = minicpm_resized(height, width, s, upscale=grid is None)
    whole = (h // s.patch_size) * (w // s.patch_size) // per_token
    if grid is None:
        return None, whole, 0
    rows, cols = grid
    refine_h, refine_w = _ensure_divide(height, rows), _ensure_divide(width, cols)
    h, w = minicpm_resized(refine_h / rows, refine_w / cols, s, upscale=True)
    return grid, whole, (h // s.patch_size) * (w // s.patch_size) // per_token


def minicpm_tokens(width: int, height: int, s: ImageSettings) -> int:
    grid, whole, per_slice = minicpm_layout(width, height, s)
    return whole + (grid[0] * grid[1] * per_slice if grid else 0)


# --- reading settings from a loaded processor ---------------------------------------------------


def qwen_settings(processor: Any) -> ImageSettings:
    ip = _image_processor(processor)
    size = getattr(ip, "size", None) or {}
    return ImageSettings(
        min_pixels=_size(size, "shortest_edge") or getattr(ip, "min_pixels", None),
        max_pixels=_size(size, "longest_edge") or getattr(ip, "max_pixels", None),
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
    )


def qwen_budget(ip: Any, max_pixels: int) -> None:
    # transformers 5 reads size["longest_edge"] (max_pixels attributes are deprecated there).
    size = dict(getattr(ip, "size", None) or {})
    factor = ip.patch_size * ip.merge_size
    size["longest_edge"] = max_pixels
    size.setdefault("shortest_edge", factor * factor)
    size["shortest_edge"] = min(size["shortest_edge"], max_pixels)
    ip.size = size


def _clip_tokens_per_tile(processor: Any, side: int) -> int:
    """Llava/NeXT: patches of a tile, plus CLS, minus CLS again under the "default" strategy."""
    extra = getattr(processor, "num_additional_image_tokens", 0) or 0
    dropped = 1 if processor.vision_feature_select_strategy == "default" else 0
    return (side // processor.patch_size) ** 2 + extra - dropped


def _crop_side(ip: Any) -> int:
    return _size(ip.crop_size, "height") if getattr(ip, "crop_size", None) else _size(ip.size, "height")


def llava_settings(processor: Any) -> ImageSettings:
    side = _crop_side(processor.image_processor)
    return ImageSettings(
        patch_size=processor.patch_size,
        image_size=side,
        tokens_per_tile=_clip_tokens_per_tile(processor, side),
    )


def llava_next_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    side = _crop_side(ip)
    return ImageSettings(
        patch_size=processor.patch_size,
        image_size=side,
        tokens_per_tile=_clip_tokens_per_tile(processor, side),
        grid_pinpoints=tuple(tuple(p) for p in ip.image_grid_pinpoints),
    )


def llava_onevision_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    side = _size(ip.size, "height")
    per_tile = processor.num_image_tokens
    return ImageSettings(
        patch_size=side // math.isqrt(per_tile),
        image_size=side,
        tokens_per_tile=per_tile,
        max_tiles=int(processor.vision_aspect_ratio.removeprefix("anyres_max_")),
        grid_pinpoints=tuple(tuple(p) for p in ip.image_grid_pinpoints),
    )


def pixtral_settings(processor: Any) -> ImageSettings:
    return ImageSettings(
        patch_size=processor.patch_size,
        merge_size=processor.spatial_merge_size,
        longest_edge=_size(processor.image_processor.size, "longest_edge"),
    )


def pixtral_budget(ip: Any, max_pixels: int) -> None:
    # The longest edge caps the area at edge^2; never above the checkpoint's own limit (its 2D RoPE).
    ip.size = {"longest_edge": min(_size(ip.size, "longest_edge"), max(math.isqrt(max_pixels), 1))}


def seq_length_settings(processor: Any) -> ImageSettings:
    """Gemma 3, PaliGemma: a fixed number of tokens per image, held by the processor."""
    return ImageSettings(
        image_size=_size(processor.image_processor.size, "height"), tokens_per_tile=processor.image_seq_length
    )


def gemma4_settings(processor: Any) -> ImageSettings:
    ip = _image_processor(processor)
    return ImageSettings(
        patch_size=ip.patch_size, merge_size=ip.pooling_kernel_size, tokens_per_tile=ip.max_soft_tokens
    )


def gemma4_budget(ip: Any, max_pixels: int) -> None:
    # The largest soft-token setting whose patches fit the budget (at least the smallest), never above
    # the checkpoint's own.
    cell_pixels = (ip.patch_size * ip.pooling_kernel_size) ** 2
    fitting = [n for n in GEMMA4_SOFT_TOKENS if n * cell_pixels <= max_pixels and n <= ip.max_soft_tokens]
    ip.max_soft_tokens = max(fitting, default=min(GEMMA4_SOFT_TOKENS[0], ip.max_soft_tokens))


GEMMA4_RELEASED_SOFT_TOKENS = 280  # the released checkpoints' processor default


def gemma4_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """Patch and pooling from the vision config; soft tokens the released default, lowered to the budget
    as gemma4_budget lowers them on a loaded processor."""
    vision = config.get("vision_config") or {}
    patch, pool = int(vision.get("patch_size") or 16), int(vision.get("pooling_kernel_size") or 3)
    soft = GEMMA4_RELEASED_SOFT_TOKENS
    if max_image_pixels:
        fitting = [n for n in GEMMA4_SOFT_TOKENS if n * (patch * pool) ** 2 <= max_image_pixels and n <= soft]
        soft = max(fitting, default=GEMMA4_SOFT_TOKENS[0])
    return ImageSettings(max_pixels=max_image_pixels, patch_size=patch, merge_size=pool, tokens_per_tile=soft)


def mllama_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    return ImageSettings(image_size=_size(ip.size, "height"), max_tiles=ip.max_image_tiles, tiling=True)


def idefics3_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    return ImageSettings(
        image_size=_size(ip.max_image_size, "longest_edge"),
        longest_edge=_size(ip.size, "longest_edge"),
        tokens_per_tile=processor.image_seq_len,
        tiling=bool(ip.do_image_splitting),
    )


def idefics3_budget(ip: Any, max_pixels: int) -> None:
    # Resized so the longest edge is a whole number of tiles with edge^2 <= budget, at least one tile.
    tile = _size(ip.max_image_size, "longest_edge")
    edge = max(tile, math.isqrt(max_pixels) // tile * tile)
    ip.size = {"longest_edge": min(_size(ip.size, "longest_edge"), edge)}


def internvl_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    # InternVLProcessor crops to tiles by default whatever the image processor's own flag says.
    tiling = type(processor).images_kwargs.get("crop_to_patches", ip.crop_to_patches)
    return ImageSettings(
        image_size=_size(ip.size, "height"),
        tokens_per_tile=processor.image_seq_length,
        min_tiles=ip.min_patches,
        max_tiles=ip.max_patches,
        tiling=bool(tiling),
    )


def internvl_budget(ip: Any, max_pixels: int) -> None:
    tile_pixels = _size(ip.size, "height") * _size(ip.size, "width")
    ip.max_patches = max(1, min(ip.max_patches, max_pixels // tile_pixels))
    ip.min_patches = min(ip.min_patches, ip.max_patches)


def aya_vision_settings(processor: Any) -> ImageSettings:
    """Aya Vision: GotOcr2 tiles as InternVL's, each (img_size / patch_size)^2 tokens (the processor's
    patch_size is the tower's times the pixel shuffle's factor: 28 for 14-pixel patches)."""
    ip = processor.image_processor
    tiling = type(processor).images_kwargs.get("crop_to_patches", ip.crop_to_patches)
    return ImageSettings(
        image_size=_size(ip.size, "height"),
        tokens_per_tile=(processor.img_size // processor.patch_size) ** 2,
        min_tiles=ip.min_patches,
        max_tiles=ip.max_patches,
        tiling=bool(tiling),
    )


def minicpm_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    return ImageSettings(
        image_size=ip.scale_resolution,
        patch_size=ip.patch_size,
        merge_size=2 if ip.downsample_mode == "4x" else 4,  # two 2x2 merges in "16x", one in "4x"
        max_tiles=ip.max_slice_nums,
        tiling=bool(ip.slice_mode),
    )


def minicpm_budget(ip: Any, max_pixels: int) -> None:
    # Slices of scale_resolution^2 pixels beside the whole image that fit the budget (never above the
    # checkpoint's); one or none leaves the image whole
    ip.max_slice_nums = max(1, min(ip.max_slice_nums, max_pixels // ip.scale_resolution**2 - 1))


# --- Llama 4: tiles of a best-fit canvas (issue 25) ------------------------------------------------------


def llama4_canvases(max_tiles: int, tile: int) -> list[tuple[int, int]]:
    """Llama4ImageProcessor's supported resolutions, (height, width), in its order: every grid of up to
    ``max_tiles`` tiles, grouped by aspect ratio in the order the ratios first appear (the order breaks ties)."""
    by_ratio: dict[float, list[tuple[int, int]]] = {}
    for tiles in range(max_tiles, 0, -1):
        for rows in sorted(d for d in range(1, tiles + 1) if tiles % d == 0):
            by_ratio.setdefault(rows / (tiles // rows), []).append((rows, tiles // rows))
    return [(rows * tile, cols * tile) for grids in by_ratio.values() for rows, cols in grids]


def llama4_canvas(height: int, width: int, max_tiles: int, tile: int) -> tuple[int, int]:
    """The canvas an image is resized into without distortion: the smallest upscale that fits, else the least
    downscale; among canvases with that scale, the smallest area (Llama4ImageProcessor's get_best_fit)."""
    canvases = llama4_canvases(max_tiles, tile)
    scales = [min(h / height, w / width) for h, w in canvases]
    up = [s for s in scales if s >= 1]
    chosen = min(up) if up else max(scales)
    fitting = [c for c, s in zip(canvases, scales, strict=True) if s == chosen]
    return min(fitting, key=lambda c: c[0] * c[1])  # the first of the smallest, as torch.argmin


def llama4_resized(height: int, width: int, canvas: tuple[int, int], tile: int) -> tuple[int, int]:
    """The image's size inside its canvas: never upscaled past one tile side, aspect ratio kept."""
    target_h, target_w = min(max(height, tile), canvas[0]), min(max(width, tile), canvas[1])
    scale_w, scale_h = target_w / width, target_h / height
    if scale_w < scale_h:
        new_h, new_w = min(math.floor(height * scale_w), target_h), target_w
    else:
        new_h, new_w = target_h, min(math.floor(width * scale_h), target_w)
    return max(new_h, 1), max(new_w, 1)


def llama4_tiles(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """(rows, columns) of tiles the image is cut into."""
    tile = _need(s, "image_size")
    canvas_h, canvas_w = llama4_canvas(height, width, _need(s, "max_tiles"), tile)
    return canvas_h // tile, canvas_w // tile


def llama4_tokens(width: int, height: int, s: ImageSettings) -> int:
    """<|patch|> tokens: tokens_per_tile for each tile, plus a global view of the whole image when there are
    several tiles."""
    rows, cols = llama4_tiles(width, height, s)
    tiles = rows * cols
    return (tiles + 1 if tiles > 1 else 1) * _need(s, "tokens_per_tile")


def llama4_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    tile = _size(ip.size, "height")
    per_tile = (tile // processor.patch_size) ** 2 // processor.downsample_ratio
    return ImageSettings(
        image_size=tile, patch_size=processor.patch_size, tokens_per_tile=per_tile, max_tiles=ip.max_patches,
        tiling=True,
    )  # fmt: skip


def llama4_budget(ip: Any, max_pixels: int) -> None:
    # As many tiles as the budget holds, at least one, never more than the checkpoint's.
    tile = _size(ip.size, "height")
    ip.max_patches = max(1, min(ip.max_patches, max_pixels // (tile * tile)))


def llama4_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """Llama 4's config: a tile is vision_config.image_size, its patches pixel-shuffled by pixel_shuffle_ratio
    (0.5: four patches per token); up to 16 tiles (the released processors' max_patches), fewer by the budget."""
    vision = config.get("vision_config") or {}
    tile, patch = int(vision.get("image_size", 336)), int(vision.get("patch_size", 14))
    shuffle = round(1 / float(vision.get("pixel_shuffle_ratio", 0.5)) ** 2)
    most = (
        LLAMA4_MAX_TILES
        if not max_image_pixels
        else max(1, min(LLAMA4_MAX_TILES, max_image_pixels // tile**2))
    )
    return ImageSettings(
        max_pixels=max_image_pixels, patch_size=patch, image_size=tile, tokens_per_tile=(tile // patch) ** 2 // shuffle,
        max_tiles=most, tiling=True,
    )  # fmt: skip


LLAMA4_MAX_TILES = 16  # Llama4ImageProcessor's max_patches in the released checkpoints

# --- LFM2-VL: Lfm2VlImageProcessor's arithmetic (transformers 5.23), which vlmtune.model.lfm2_images runs on
# PIL. An image up to max_pixels_tolerance x its token budget is resized whole (smart resize: sides multiples
# of patch * downsample, pixels within [min_pixels, max_pixels]); a larger one is resized onto a grid of
# square tiles of image_size whose shape is closest to its aspect ratio, plus the smart-resized thumbnail.
# Settings: patch_size = encoder_patch_size, merge_size = downsample_factor, image_size = tile_size,
# min/max_pixels = min/max_image_tokens * (patch * downsample)^2.


def _round_by(number: float, factor: int) -> int:
    return round(number / factor) * factor  # Python's round, as upstream's: halves go to the even multiple


def lfm2_smart_resize(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """(height, width) of the whole image (one tile, or the thumbnail of a split one)."""
    factor = s.patch_size * s.merge_size
    least, most = _need(s, "min_pixels"), _need(s, "max_pixels")
    h_bar, w_bar = max(factor, _round_by(height, factor)), max(factor, _round_by(width, factor))
    if h_bar * w_bar > most:
        beta = math.sqrt(height * width / most)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < least:
        beta = math.sqrt(least / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def lfm2_too_large(height: int, width: int, s: ImageSettings) -> bool:
    """Past the tolerance, the image is split into tiles (upstream rounds to at least one patch here)."""
    factor = s.patch_size * s.merge_size
    h_bar, w_bar = max(s.patch_size, _round_by(height, factor)), max(s.patch_size, _round_by(width, factor))
    return h_bar * w_bar > _need(s, "max_pixels") * s.max_pixels_tolerance


@cache
def lfm2_target_ratios(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """The (columns, rows) grids of min_tiles..max_tiles tiles, fewest tiles first (a stable sort of a set,
    as upstream's: the order among grids of one tile count decides ties, so it is upstream's set order)."""
    ratios = [(w, h) for n in range(min_tiles, max_tiles + 1) for w in range(1, n + 1) for h in range(1, n + 1)
              if min_tiles <= w * h <= max_tiles]  # fmt: skip
    return tuple(sorted(set(ratios), key=lambda r: r[0] * r[1]))


def lfm2_grid(height: int, width: int, s: ImageSettings) -> tuple[int, int]:
    """(columns, rows) of the grid whose aspect ratio is closest to the image's; on a tie the later grid wins
    when the image covers over half of its area."""
    aspect, area, tile = width / height, width * height, _need(s, "image_size")
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in lfm2_target_ratios(s.min_tiles, _need(s, "max_tiles")):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best


def lfm2_layout(width: int, height: int, s: ImageSettings) -> tuple[int, int, int, int]:
    """(rows, cols, thumbnail height, thumbnail width): 1 x 1 for an image resized whole, whose size is then
    the smart-resized one."""
    resized_h, resized_w = lfm2_smart_resize(height, width, s)
    splitting = s.tiling and not s.min_tiles == _need(s, "max_tiles") == 1
    if splitting and lfm2_too_large(height, width, s):
        cols, rows = lfm2_grid(height, width, s)
        return rows, cols, resized_h, resized_w
    return 1, 1, resized_h, resized_w


def lfm2_tiles(width: int, height: int, s: ImageSettings) -> tuple[int, int]:
    """(rows, cols): the grid decides the <|img_row_R_col_C|> markers of the prompt."""
    rows, cols, _, _ = lfm2_layout(width, height, s)
    return rows, cols


def _lfm2_tokens_of(height: int, width: int, s: ImageSettings) -> int:
    return math.ceil(height // s.patch_size / s.merge_size) * math.ceil(width // s.patch_size / s.merge_size)


def lfm2_tokens(width: int, height: int, s: ImageSettings) -> int:
    """<image> tokens: each tile's (image_size / patch / downsample)^2 and the thumbnail's, or the whole
    smart-resized image's."""
    rows, cols, resized_h, resized_w = lfm2_layout(width, height, s)
    whole = _lfm2_tokens_of(resized_h, resized_w, s)
    if rows * cols == 1:
        return whole
    return rows * cols * _need(s, "tokens_per_tile") + (whole if s.thumbnail else 0)


def lfm2_settings_of(ip: Any) -> ImageSettings:
    """From an Lfm2VlImageProcessor's attributes (or the same names on a namespace)."""
    pixels_per_token = (ip.encoder_patch_size * ip.downsample_factor) ** 2
    return ImageSettings(
        min_pixels=ip.min_image_tokens * pixels_per_token, max_pixels=ip.max_image_tokens * pixels_per_token,
        patch_size=ip.encoder_patch_size, merge_size=ip.downsample_factor, image_size=ip.tile_size,
        tokens_per_tile=math.ceil(ip.tile_size // ip.encoder_patch_size / ip.downsample_factor) ** 2,
        min_tiles=ip.min_tiles, max_tiles=ip.max_tiles, tiling=bool(ip.do_image_splitting),
        max_pixels_tolerance=ip.max_pixels_tolerance, thumbnail=bool(ip.use_thumbnail),
    )  # fmt: skip


def lfm2_settings(processor: Any) -> ImageSettings:
    return lfm2_settings_of(_image_processor(processor))


def lfm2_budget(ip: Any, max_pixels: int) -> None:
    # The whole image's tokens within the budget (never under min_image_tokens), and as many tiles as it holds;
    # fewer than min_tiles: no splitting (the image is then resized whole, within max_image_tokens).
    pixels_per_token = (ip.encoder_patch_size * ip.downsample_factor) ** 2
    ip.max_image_tokens = max(ip.min_image_tokens, min(ip.max_image_tokens, max_pixels // pixels_per_token))
    tiles = min(ip.max_tiles, max_pixels // ip.tile_size**2)
    if tiles < ip.min_tiles:
        ip.do_image_splitting = False
    else:
        ip.max_tiles = tiles


LFM2_RELEASED = dict(min_image_tokens=64, max_image_tokens=256, min_tiles=2, max_tiles=10, tile_size=512,
                     max_pixels_tolerance=2.0, use_thumbnail=True, do_image_splitting=True)  # fmt: skip


def lfm2_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """LFM2-VL from its config: the released processors' settings (LFM2_RELEASED, as Lfm2VlImageProcessor's
    defaults) with the config's patch and downsample, lowered to the budget as lfm2_budget lowers them."""
    vision = config.get("vision_config") or {}
    ip = SimpleNamespace(**LFM2_RELEASED, encoder_patch_size=first_int(vision.get("patch_size")) or 16,
                         downsample_factor=int(config.get("downsample_factor") or 2))  # fmt: skip
    if max_image_pixels:
        lfm2_budget(ip, max_image_pixels)
    return lfm2_settings_of(ip)


# --- settings from a config alone (no processor at hand) ----------------------------------------


def first_int(value: Any) -> int | None:
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    return int(value) if isinstance(value, (int, float)) and value else None


def image_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """ImageSettings from config keys alone (no processor at hand), with the recipe's pixel budget.

    Reads the keys transformers configs use for the same idea, whatever the family: patch_size,
    spatial_merge_size / scale_factor / downsample_ratio, image_size, mm_tokens_per_image /
    image_seq_length / num_image_tokens (else (image_size / patch / merge)^2), image_grid_pinpoints.
    Tiling processors tile (their default), with as many tiles as the budget holds, and the
    longest edge is the budget's side rounded down to whole tiles (at least one), as the families'
    pixel-budget functions set it on a loaded processor.
    """
    vision = config.get("vision_config") or {}
    merge = vision.get("spatial_merge_size") or config.get("spatial_merge_size") or config.get("scale_factor")
    if not merge and config.get("downsample_ratio"):
        merge = round(1 / config["downsample_ratio"])
    merge = int(merge or 1)
    patch = first_int(vision.get("patch_size")) or 14
    side = first_int(vision.get("image_size"))
    per_tile = first_int(
        config.get("mm_tokens_per_image") or config.get("image_seq_length") or vision.get("num_image_tokens")
    )
    if side and (per_tile is None or ((side // patch) ** 2) % per_tile):
        # A count that does not divide the tile's patches belongs to another tower (LlavaConfig's
        # default image_seq_length rides along in Pixtral configs): derive it from the geometry.
        per_tile = (side // patch // merge) ** 2
    budget_side = math.isqrt(max_image_pixels) if max_image_pixels else None
    longest_edge = max_tiles = None
    if side and budget_side:
        longest_edge = max(side, budget_side // side * side)
        max_tiles = max(1, max_image_pixels // (side * side))
    aspect = str(config.get("vision_aspect_ratio") or "")
    if aspect.startswith("anyres_max_"):
        max_tiles = int(aspect.removeprefix("anyres_max_"))
    return ImageSettings(
        max_pixels=max_image_pixels,
        patch_size=patch,
        merge_size=merge,
        image_size=side,
        tokens_per_tile=per_tile,
        max_tiles=first_int(vision.get("max_num_tiles")) or max_tiles,
        tiling=True,
        longest_edge=longest_edge,
        grid_pinpoints=tuple(tuple(p) for p in config.get("image_grid_pinpoints") or ()),
    )


AYA_VISION_RELEASED_TILES = 12  # CohereLabs/aya-vision-*: GotOcr2's max_patches


def aya_vision_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """Aya Vision from its config: tiles of image_size, each (image_size / patch / downsample_factor)^2
    tokens; up to the released processor's 12 tiles, lowered to the budget as internvl_budget lowers them."""
    vision = config.get("vision_config") or {}
    side, patch = int(vision.get("image_size") or 364), int(vision.get("patch_size") or 14)
    merge = int(config.get("downsample_factor") or 2)
    tiles = AYA_VISION_RELEASED_TILES
    if max_image_pixels:
        tiles = max(1, min(tiles, max_image_pixels // (side * side)))
    return ImageSettings(
        max_pixels=max_image_pixels, patch_size=patch, merge_size=merge, image_size=side,
        tokens_per_tile=(side // (patch * merge)) ** 2, max_tiles=tiles, tiling=True,
    )  # fmt: skip


MINICPM_RELEASED_SLICES = 9  # openbmb/MiniCPM-V-4.6: max_slice_nums


def minicpm_settings_from_config(config: dict, max_image_pixels: int | None) -> ImageSettings:
    """MiniCPM-V from its config: slices of image_size^2 pixels, up to the released 9, lowered to the budget
    as minicpm_budget lowers them."""
    side = int(config.get("image_size") or 448)
    slices = MINICPM_RELEASED_SLICES
    if max_image_pixels:
        slices = max(1, min(slices, max_image_pixels // side**2 - 1))
    return ImageSettings(
        max_pixels=max_image_pixels, image_size=side,
        patch_size=first_int((config.get("vision_config") or {}).get("patch_size")) or 14,
        merge_size=2 if config.get("downsample_mode") == "4x" else 4, max_tiles=slices, tiling=True,
    )  # fmt: skip


# --- what the memory model needs -------------------------------------------------------------


def image_patches(tokens: int, settings: ImageSettings, cross_attention_tiles: int | None = None) -> int:
    """Vision-tower positions behind ``tokens`` language tokens of one image.

    Towers of a fixed tile size see (image_size / patch)^2 patches for each tile's tokens_per_tile
    tokens; dynamic-resolution towers (no image_size) merge^2 patches per token. A tower the text
    reaches by cross-attention (Mllama: one text token per image) sees all its tiles.
    """
    if cross_attention_tiles and settings.image_size:
        return cross_attention_tiles * (settings.image_size // settings.patch_size) ** 2
    if settings.image_size and settings.tokens_per_tile:
        per_tile = (settings.image_size // settings.patch_size) ** 2
        return max(1, round(tokens * per_tile / settings.tokens_per_tile))
    return tokens * settings.merge_size**2


def default_image_size(max_image_pixels: int | None) -> tuple[int, int]:
    side = math.isqrt(max_image_pixels) if max_image_pixels else DEFAULT_IMAGE_SIDE
    return side, side
