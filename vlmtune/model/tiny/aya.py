"""Tiny Aya Vision checkpoint: a 2-layer SigLIP tower, Aya's pixel-shuffle SwiGLU projector and a 2-layer
Cohere2 decoder (one sliding-window layer, one global).

The text says <image> once per image; the processor crops it into up to MAX_TILES tiles of TILE pixels
(GotOcr2's closest-aspect grid, plus a global thumbnail when there is more than one tile) and writes
<|START_OF_IMG|>, then per tile TILE_i + <|IMG_PATCH|> x tokens per tile, then TILE_GLOBAL + its patch
tokens, then <|END_OF_IMG|>. Cohere2's config carries a logit_scale that Aya Vision's forward does not
apply (the record says so: Family.applies_logit_scale); the tiny model keeps Cohere2's default 0.0625
so that the loss parity test sees the difference if vlmtune ever applied it.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.tiny.common import save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

TILE, PATCH, MAX_TILES = 32, 8, 4
# Aya's pixel shuffle halves each side: (TILE / PATCH / 2)^2 tokens per tile; the processor counts them
# as (img_size / patch_size)^2 with its patch_size the tower's times the shuffle factor (released 28).
PROCESSOR_PATCH = PATCH * 2

# CohereLabs/aya-vision-*: Command-R turns, <image> per image, answers closed by <|END_OF_TURN_TOKEN|>.
AYA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = {'user': '<|USER_TOKEN|>', 'assistant': '<|CHATBOT_TOKEN|>', "
    "'system': '<|SYSTEM_TOKEN|>'}[message['role']] -%}"
    "{{ '<|START_OF_TURN_TOKEN|>' + role }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|END_OF_TURN_TOKEN|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' }}{%- endif -%}"
)


def build_aya_vision(out: Path) -> None:
    from transformers import (
        AyaVisionConfig,
        AyaVisionForConditionalGeneration,
        AyaVisionProcessor,
        Cohere2Config,
        GotOcr2ImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(
        bos="<BOS_TOKEN>",
        eos="<|END_OF_TURN_TOKEN|>",
        pad="<PAD>",
        special_tokens=(
            "<|START_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
            "<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>",
            "TILE", "TILE_GLOBAL",
        ),
        add_bos=True,
        chat_template=AYA_CHAT_TEMPLATE,
    )  # fmt: skip
    text = Cohere2Config(
        **text_config(
            tokenizer,
            layer_types=["sliding_attention", "full_attention"],
            sliding_window=64,
            tie_word_embeddings=True,  # as released
        )
    )
    vision = SiglipVisionConfig(**vision_config(image_size=TILE, patch_size=PATCH, vision_use_head=False))
    config = AyaVisionConfig(
        vision_config=vision,
        text_config=text,
        downsample_factor=2,
        image_token_index=tokenizer.convert_tokens_to_ids("<|IMG_PATCH|>"),
        tie_word_embeddings=True,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES
    )
    processor = AyaVisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PROCESSOR_PATCH,
        img_size=TILE,
        chat_template=AYA_CHAT_TEMPLATE,
    )
    seed()
    save(AyaVisionForConditionalGeneration(config), processor, out, ("<|END_OF_TURN_TOKEN|>",))
