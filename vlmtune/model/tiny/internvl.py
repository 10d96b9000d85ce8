"""Tiny InternVL checkpoint (transformers-native InternVL3 layout: InternViT, pixel-shuffle MLP, Qwen2).

The text says <IMG_CONTEXT> once per image; the processor crops the image into up to max_patches
tiles (+ a thumbnail) and writes <img> + <IMG_CONTEXT> x (tiles x image_seq_length) + </img>.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import INTERNVL
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

TILE, PATCH, MAX_TILES = 32, 8, 4
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // 4  # pixel shuffle with downsample_ratio 0.5

# OpenGVLab/InternVL3-*-hf: ChatML, "<IMG_CONTEXT>\n" per image.
INTERNVL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<IMG_CONTEXT>\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_internvl(out: Path) -> None:
    from transformers import (
        GotOcr2ImageProcessorPil,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLVisionConfig,
        Qwen2Config,
    )

    tokenizer = build_tokenizer(
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special_tokens=("<|im_start|>",),
        named_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    vision = InternVLVisionConfig(
        **vision_config(image_size=[TILE, TILE], patch_size=[PATCH, PATCH], use_mask_token=False)
    )
    config = InternVLConfig(
        vision_config=vision,
        text_config=Qwen2Config(**text_config(tokenizer)),
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
        tie_word_embeddings=False,
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES
    )
    processor = image_only_processor_class(INTERNVL)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    seed()
    save(InternVLForConditionalGeneration(config), processor, out, ("<|im_end|>",))
