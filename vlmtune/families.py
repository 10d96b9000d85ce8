"""One declarative record per VLM architecture.

Stages never branch on a model name: they read these records. Adding a family means adding a
record here and a builder in ``vlmtune.tiny``; docs/adding-a-family.md walks through it.

Module prefixes are the in-memory names of transformers 5 (``model.visual``, not ``visual``):
bitsandbytes' skip list and peft's target regex are anchored on them, because bare suffixes
collide (Qwen2.5-VL's vision MLP and Pixtral's vision attention reuse the language names).

The image-token functions below are pure arithmetic re-derived from transformers 5.23's image
processors; tests/test_families.py checks them against the real processors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vlmtune import shims
from vlmtune.errors import ModelError

LANGUAGE_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LANGUAGE_MLP = ("gate_proj", "up_proj", "down_proj")
CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
CLIP_MLP = ("fc1", "fc2")

COMPONENTS = ("vision", "projector", "language", "lm_head", "other")


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


TokensPerImage = Callable[[int, int, ImageSettings], int]


@dataclass(frozen=True)
class Family:
    """Everything a stage needs to know about one architecture."""

    name: str  # the id users write: tiny:<name>, `vlmtune tiny <name>`
    title: str
    model_types: tuple[str, ...]  # config.model_type values this record claims
    vision_prefix: str
    projector_prefixes: tuple[str, ...]
    language_prefix: str
    image_token: str  # the placeholder the processor expands into image tokens
    # Image feature tokens per image: tokens_per_image(width, height, image_settings(processor)).
    # It counts image_feature_token occurrences (structural tokens around them are not counted).
    tokens_per_image: TokensPerImage
    vision_attention: tuple[str, ...] = CLIP_ATTENTION
    vision_mlp: tuple[str, ...] = CLIP_MLP
    language_attention: tuple[str, ...] = LANGUAGE_ATTENTION
    language_mlp: tuple[str, ...] = LANGUAGE_MLP
    lm_head: str = "lm_head"
    # config.vision_config.model_type values that select this record over a plain model_type
    # match (Pixtral-12B checkpoints say model_type "llava").
    vision_model_types: tuple[str, ...] = ()
    structural_tokens: tuple[str, ...] = ()  # vision tokens besides image_token, masked from the loss
    # The token repeated once per image feature where it differs from the placeholder (Gemma 3
    # writes <start_of_image> and gets <image_soft_token> x 256).
    feature_token: str | None = None
    extra_inputs: tuple[str, ...] = ()  # processor outputs the model needs besides ids/mask/pixels
    # token_type_ids mark the causal answer (1) after a bidirectional prefix (0), PaliGemma's
    # prefix-LM: the collator sets them from the labels, since a chat template has no "suffix".
    token_types_from_labels: bool = False
    # The chat template used where the checkpoint ships none (PaliGemma); documented in docs/families.md.
    chat_template: str | None = None
    # Processor class to build without a video processor when AutoProcessor needs torchvision.
    processor_class: str | None = None
    processor_needs_video: bool = False  # its __init__ requires a (torchvision-only) video processor
    prepare_processor_import: Callable[[], None] | None = None  # shims run before importing the class
    # How the recipe's pixel budget is written into the image processor (None: fixed resolution).
    pixel_budget: Callable[[Any, int], None] | None = None
    # The processor (or, for Qwen, its image processor alone) -> the settings tokens_per_image reads.
    image_settings: Callable[[Any], ImageSettings] = field(default=lambda processor: ImageSettings())

    def component_of(self, module_name: str) -> str:
        """vision | projector | language | lm_head | other, by anchored prefix."""
        if module_name == self.lm_head:
            return "lm_head"
        if any(_under(module_name, p) for p in self.projector_prefixes):
            return "projector"
        if _under(module_name, self.vision_prefix):
            return "vision"
        if _under(module_name, self.language_prefix):
            return "language"
        return "other"

    def keep_16bit(self) -> list[str]:
        """Full module prefixes bitsandbytes must leave alone (the default list is replaced)."""
        return [self.vision_prefix, *self.projector_prefixes, self.lm_head]

    @property
    def image_feature_token(self) -> str:
        return self.feature_token or self.image_token

    @property
    def vision_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((self.image_token, self.image_feature_token, *self.structural_tokens)))


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


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


def pixtral_tokens(width: int, height: int, s: ImageSettings) -> int:
    """[IMG] tokens: rows x cols of (patch x merge) cells after fitting the longest edge.

    The processor adds one [IMG_BREAK] per row (the last one is [IMG_END]) on top.
    """
    edge = s.longest_edge or _need(s, "image_size")  # a config's image_size is the longest edge
    cell = s.patch_size * s.merge_size
    ratio = max(height / edge, width / edge)
    if ratio > 1:
        height, width = int(math.floor(height / ratio)), int(math.floor(width / ratio))
    return ((height - 1) // cell + 1) * ((width - 1) // cell + 1)


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


# --- reading settings from a loaded processor ---------------------------------------------------


def _qwen_settings(processor: Any) -> ImageSettings:
    ip = _image_processor(processor)
    size = getattr(ip, "size", None) or {}
    return ImageSettings(
        min_pixels=_size(size, "shortest_edge") or getattr(ip, "min_pixels", None),
        max_pixels=_size(size, "longest_edge") or getattr(ip, "max_pixels", None),
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
    )


def _qwen_budget(ip: Any, max_pixels: int) -> None:
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


def _llava_settings(processor: Any) -> ImageSettings:
    side = _crop_side(processor.image_processor)
    return ImageSettings(
        patch_size=processor.patch_size,
        image_size=side,
        tokens_per_tile=_clip_tokens_per_tile(processor, side),
    )


def _llava_next_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    side = _crop_side(ip)
    return ImageSettings(
        patch_size=processor.patch_size,
        image_size=side,
        tokens_per_tile=_clip_tokens_per_tile(processor, side),
        grid_pinpoints=tuple(tuple(p) for p in ip.image_grid_pinpoints),
    )


def _llava_onevision_settings(processor: Any) -> ImageSettings:
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


def _pixtral_settings(processor: Any) -> ImageSettings:
    return ImageSettings(
        patch_size=processor.patch_size,
        merge_size=processor.spatial_merge_size,
        longest_edge=_size(processor.image_processor.size, "longest_edge"),
    )


def _pixtral_budget(ip: Any, max_pixels: int) -> None:
    # The longest edge caps the area at edge^2; never above the checkpoint's own limit (its 2D RoPE).
    ip.size = {"longest_edge": min(_size(ip.size, "longest_edge"), max(math.isqrt(max_pixels), 1))}


def _seq_length_settings(processor: Any) -> ImageSettings:
    """Gemma 3, PaliGemma: a fixed number of tokens per image, held by the processor."""
    return ImageSettings(
        image_size=_size(processor.image_processor.size, "height"), tokens_per_tile=processor.image_seq_length
    )


def _mllama_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    return ImageSettings(image_size=_size(ip.size, "height"), max_tiles=ip.max_image_tiles, tiling=True)


def _idefics3_settings(processor: Any) -> ImageSettings:
    ip = processor.image_processor
    return ImageSettings(
        image_size=_size(ip.max_image_size, "longest_edge"),
        longest_edge=_size(ip.size, "longest_edge"),
        tokens_per_tile=processor.image_seq_len,
        tiling=bool(ip.do_image_splitting),
    )


def _idefics3_budget(ip: Any, max_pixels: int) -> None:
    # Resized so the longest edge is a whole number of tiles with edge^2 <= budget, at least one tile.
    tile = _size(ip.max_image_size, "longest_edge")
    edge = max(tile, math.isqrt(max_pixels) // tile * tile)
    ip.size = {"longest_edge": min(_size(ip.size, "longest_edge"), edge)}


def _internvl_settings(processor: Any) -> ImageSettings:
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


def _internvl_budget(ip: Any, max_pixels: int) -> None:
    tile_pixels = _size(ip.size, "height") * _size(ip.size, "width")
    ip.max_patches = max(1, min(ip.max_patches, max_pixels // tile_pixels))
    ip.min_patches = min(ip.min_patches, ip.max_patches)


# --- the records --------------------------------------------------------------------------------

_QWEN_COMMON = dict(
    projector_prefixes=("model.visual.merger",),
    vision_prefix="model.visual",
    language_prefix="model.language_model",
    image_token="<|image_pad|>",
    structural_tokens=("<|vision_start|>", "<|vision_end|>", "<|video_pad|>"),
    tokens_per_image=qwen_tokens,
    pixel_budget=_qwen_budget,
    image_settings=_qwen_settings,
)

QWEN2_VL = Family(
    name="qwen2_vl",
    title="Qwen2-VL",
    model_types=("qwen2_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.fc1", "mlp.fc2"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),  # M-RoPE: forward raises without the latter
    processor_class="Qwen2VLProcessor",
    processor_needs_video=True,
    **_QWEN_COMMON,
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    title="Qwen2.5-VL",
    model_types=("qwen2_5_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_class="Qwen2_5_VLProcessor",
    processor_needs_video=True,
    **_QWEN_COMMON,
)

QWEN3_VL = Family(
    name="qwen3_vl",
    title="Qwen3-VL",
    model_types=("qwen3_vl",),
    vision_attention=("attn.qkv", "attn.proj"),
    vision_mlp=("mlp.linear_fc1", "mlp.linear_fc2"),
    extra_inputs=("image_grid_thw", "mm_token_type_ids"),
    processor_class="Qwen3VLProcessor",
    processor_needs_video=True,
    **{**_QWEN_COMMON, "projector_prefixes": ("model.visual.merger", "model.visual.deepstack_merger_list")},
)

_LLAVA_LAYOUT = dict(
    vision_prefix="model.vision_tower",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
)

LLAVA = Family(
    name="llava",
    title="Llava-1.5",
    model_types=("llava",),
    image_token="<image>",
    tokens_per_image=fixed_tokens,
    image_settings=_llava_settings,
    **_LLAVA_LAYOUT,
)

LLAVA_NEXT = Family(
    name="llava_next",
    title="LLaVA-NeXT",
    model_types=("llava_next",),
    image_token="<image>",
    extra_inputs=("image_sizes",),
    tokens_per_image=llava_next_tokens,
    image_settings=_llava_next_settings,
    **_LLAVA_LAYOUT,
)

LLAVA_ONEVISION = Family(
    name="llava_onevision",
    title="LLaVA-OneVision",
    model_types=("llava_onevision",),
    image_token="<image>",
    structural_tokens=("<video>",),
    extra_inputs=("image_sizes", "batch_num_images"),
    processor_class="LlavaOnevisionProcessor",
    processor_needs_video=True,
    tokens_per_image=llava_onevision_tokens,
    image_settings=_llava_onevision_settings,
    **_LLAVA_LAYOUT,
)

_PIXTRAL_COMMON = dict(
    image_token="[IMG]",
    structural_tokens=("[IMG_BREAK]", "[IMG_END]"),
    # Pixtral's vision tower uses the language model's Linear names; the anchored prefix keeps
    # the two apart.
    vision_attention=("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
    vision_mlp=("feed_forward.gate_proj", "feed_forward.up_proj", "feed_forward.down_proj"),
    extra_inputs=("image_sizes",),
    processor_class="PixtralProcessor",
    prepare_processor_import=shims.pixtral_processor_without_torchvision,
    tokens_per_image=pixtral_tokens,
    pixel_budget=_pixtral_budget,
    image_settings=_pixtral_settings,
    **_LLAVA_LAYOUT,
)

PIXTRAL = Family(
    name="pixtral",
    title="Pixtral",
    model_types=("llava",),
    vision_model_types=("pixtral",),
    **_PIXTRAL_COMMON,
)

MISTRAL3 = Family(
    name="mistral3",
    title="Mistral3",
    model_types=("mistral3",),
    **_PIXTRAL_COMMON,
)

GEMMA3 = Family(
    name="gemma3",
    title="Gemma 3",
    model_types=("gemma3",),
    image_token="<start_of_image>",
    feature_token="<image_soft_token>",
    structural_tokens=("<end_of_image>",),
    extra_inputs=("token_type_ids",),
    tokens_per_image=fixed_tokens,
    image_settings=_seq_length_settings,
    **_LLAVA_LAYOUT,
)

MLLAMA = Family(
    name="mllama",
    title="Llama 3.2 Vision",
    model_types=("mllama",),
    vision_prefix="model.vision_model",
    projector_prefixes=("model.multi_modal_projector",),
    language_prefix="model.language_model",
    image_token="<|image|>",
    vision_attention=("q_proj", "k_proj", "v_proj", "o_proj"),
    # language_attention's names also cover the cross-attention layers (cross_attn.q_proj ...)
    extra_inputs=("cross_attention_mask", "aspect_ratio_ids", "aspect_ratio_mask"),
    tokens_per_image=one_token,
    image_settings=_mllama_settings,
)

_IDEFICS3_COMMON = dict(
    vision_prefix="model.vision_model",
    projector_prefixes=("model.connector",),
    language_prefix="model.text_model",
    image_token="<image>",
    structural_tokens=(
        "<fake_token_around_image>",
        "<global-img>",
        *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
    ),
    extra_inputs=("pixel_attention_mask",),
    tokens_per_image=idefics3_tokens,
    pixel_budget=_idefics3_budget,
    image_settings=_idefics3_settings,
)

IDEFICS3 = Family(name="idefics3", title="Idefics3", model_types=("idefics3",), **_IDEFICS3_COMMON)

SMOLVLM = Family(
    name="smolvlm",
    title="SmolVLM",
    model_types=("smolvlm",),
    # SmolVLMProcessor needs num2words and a (torchvision-only) video processor; its image prompts
    # are Idefics3's, character for character, so Idefics3Processor serves SmolVLM checkpoints.
    processor_class="Idefics3Processor",
    **_IDEFICS3_COMMON,
)

# PaliGemma has no chat template upstream: it is trained on "<image>...<bos>prefix\n" + answer +
# <eos>, its processor adding <bos> after the last image and "\n" at the end. This template renders
# a conversation in that shape (images and user text, "\n", the answer, <eos>), so each turn's
# prompt is a prefix of the whole conversation, which the collator needs to find the answers.
PALIGEMMA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if message['role'] != 'assistant' and (part['type'] == 'image' or 'image' in part "
    "or 'image_url' in part) -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- else -%}{{ '\n' }}{%- endif -%}"
    "{%- endfor -%}"
)

PALIGEMMA = Family(
    name="paligemma",
    title="PaliGemma",
    model_types=("paligemma",),
    image_token="<image>",
    extra_inputs=("token_type_ids",),
    token_types_from_labels=True,
    chat_template=PALIGEMMA_CHAT_TEMPLATE,
    tokens_per_image=fixed_tokens,
    image_settings=_seq_length_settings,
    **_LLAVA_LAYOUT,
)

INTERNVL = Family(
    name="internvl",
    title="InternVL",
    model_types=("internvl",),
    image_token="<IMG_CONTEXT>",
    structural_tokens=("<img>", "</img>", "<video>"),
    vision_attention=(
        "attention.q_proj",
        "attention.k_proj",
        "attention.v_proj",
        "attention.projection_layer",
    ),
    vision_mlp=("mlp.fc1", "mlp.fc2"),
    processor_class="InternVLProcessor",
    processor_needs_video=True,
    tokens_per_image=internvl_tokens,
    pixel_budget=_internvl_budget,
    image_settings=_internvl_settings,
    **_LLAVA_LAYOUT,
)

FAMILIES: tuple[Family, ...] = (
    QWEN2_VL,
    QWEN2_5_VL,
    QWEN3_VL,
    LLAVA,
    LLAVA_NEXT,
    LLAVA_ONEVISION,
    PIXTRAL,
    MISTRAL3,
    GEMMA3,
    MLLAMA,
    IDEFICS3,
    SMOLVLM,
    PALIGEMMA,
    INTERNVL,
)


def family_names() -> list[str]:
    return [f.name for f in FAMILIES]


def get_family(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ModelError(f"unknown family {name!r}", hint=f"choose one of: {', '.join(family_names())}")


def detect_family(config: Any) -> Family:
    """Pick the record for a transformers config (or its dict) from its model types."""
    as_dict: Mapping[str, Any] = config if isinstance(config, Mapping) else config.to_dict()
    model_type = as_dict.get("model_type")
    vision_type = (as_dict.get("vision_config") or {}).get("model_type")
    for family in FAMILIES:  # the specific match (vision model type) wins over the plain one
        if vision_type and vision_type in family.vision_model_types and model_type in family.model_types:
            return family
    for family in FAMILIES:
        if model_type in family.model_types and not family.vision_model_types:
            return family
    supported = ", ".join(f"{f.title} ({'/'.join(f.model_types)})" for f in FAMILIES)
    raise ModelError(
        f"unsupported architecture: model_type {model_type!r}"
        + (f" with a {vision_type!r} vision tower" if vision_type else ""),
        hint=f"vlmtune supports {supported}. To add one, see docs/adding-a-family.md.",
    )
