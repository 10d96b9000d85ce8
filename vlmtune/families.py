"""One declarative record per VLM architecture.

Stages never branch on a model name: they read these records. Adding a family means adding a
record here and a builder in ``vlmtune.tiny``; docs/adding-a-family.md walks through it.

Module prefixes are the in-memory names of transformers 5 (``model.visual``, not ``visual``):
bitsandbytes' skip list and peft's target regex are anchored on them, because bare suffixes
collide (Qwen2.5-VL's vision MLP and Pixtral's vision attention reuse the language names).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

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
    image_size: int | None = None  # fixed-resolution towers (CLIP, SigLIP)
    tokens_per_tile: int | None = None
    max_tiles: int | None = None


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
    extra_inputs: tuple[str, ...] = ()  # processor outputs the model needs besides ids/mask/pixels
    # Processor class to build without a video processor when AutoProcessor needs torchvision.
    processor_class: str | None = None
    processor_needs_video: bool = False  # its __init__ requires a (torchvision-only) video processor
    prepare_processor_import: Callable[[], None] | None = None  # shims run before importing the class
    # How the recipe's pixel budget is written into the image processor: attribute -> value fn.
    pixel_budget: Callable[[Any, int], None] | None = None
    image_settings: Callable[[Any], ImageSettings] = field(default=lambda ip: ImageSettings())

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
    def vision_tokens(self) -> tuple[str, ...]:
        return (self.image_token, *self.structural_tokens)


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


# --- image-token arithmetic -------------------------------------------------------------------


def qwen_resized(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's smart_resize: sides rounded to ``factor``, area kept inside [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is over 200, which Qwen processors refuse")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
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
    h, w = qwen_resized(height, width, factor, s.min_pixels or factor * factor, s.max_pixels or 16384 * 28 * 28)
    return (h // factor) * (w // factor)


def _qwen_settings(ip: Any) -> ImageSettings:
    size = getattr(ip, "size", None) or {}
    return ImageSettings(
        min_pixels=size.get("shortest_edge") or getattr(ip, "min_pixels", None),
        max_pixels=size.get("longest_edge") or getattr(ip, "max_pixels", None),
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
    extra_inputs=("image_grid_thw",),
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
    extra_inputs=("image_grid_thw",),
    processor_class="Qwen2_5_VLProcessor",
    processor_needs_video=True,
    **_QWEN_COMMON,
)

FAMILIES: tuple[Family, ...] = (QWEN2_VL, QWEN2_5_VL)


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
