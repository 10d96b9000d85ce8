"""Tiny Qwen3-VL checkpoint: 16-pixel patches merged 2x2 (32x32 pixels per token), deepstack mergers."""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import QWEN3_VL
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import save, seed, text_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

PATCH, MERGE, TEMPORAL_PATCH = 16, 2, 2
MIN_PIXELS, MAX_PIXELS = 64 * 64, 256 * 256  # 4 to 64 tokens per image

# Qwen/Qwen3-VL-*-Instruct: ChatML without a default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_qwen3_vl(out: Path) -> None:
    from transformers import (
        Qwen2VLImageProcessorPil,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLTextConfig,
        Qwen3VLVisionConfig,
    )

    tokenizer = build_tokenizer(
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special_tokens=("<|im_start|>",),
        named_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )
    text = Qwen3VLTextConfig(
        **text_config(
            tokenizer,
            # interleaved M-RoPE; sum(mrope_section) = head_dim / 2
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 3, 3],
                "mrope_interleaved": True,
            },
        )
    )
    vision = Qwen3VLVisionConfig(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=text.hidden_size,
        num_position_embeddings=64,
        deepstack_visual_indexes=[0],
    )
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
        tie_word_embeddings=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor_class(QWEN3_VL)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN3_VL_CHAT_TEMPLATE
    )
    seed()
    save(Qwen3VLForConditionalGeneration(config), processor, out, ("<|im_end|>", "<|endoftext|>"))
