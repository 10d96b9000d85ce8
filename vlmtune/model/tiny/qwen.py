"""Tiny Qwen2-VL and Qwen2.5-VL checkpoints: real classes, real chat template, random weights."""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import QWEN2_5_VL, QWEN2_VL
from vlmtune.model.processing import image_only_processor_class, save_processor
from vlmtune.model.tiny.tokenizer import train_byte_bpe

# The released Qwen2-VL / Qwen2.5-VL chat template, byte for byte (TRL recognises it).
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = (
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Geometry: patch 14, merge 2, so image sides are multiples of 28; 4 to 64 tokens per image.
PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56, 224 * 224


def build_tokenizer():
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab, merges = train_byte_bpe("<|endoftext|>")
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        errors="replace",
        model_max_length=32768,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    return tokenizer


def _processor(family, tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
    )
    cls = image_only_processor_class(family)
    return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_CHAT_TEMPLATE)


def _text_config(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        # sum(mrope_section) must equal head_dim / 2 (= 8 here)
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|im_end|>"),
        pad_token_id=ids("<|endoftext|>"),
        tie_word_embeddings=False,
        # Wider than the released 0.02: with 64-wide hidden states a 0.02 lm_head caps logits near
        # 1.3, so no adapter could fit the demo data; 0.2 leaves room to learn.
        initializer_range=0.2,
    )


def _token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _save(model, processor, tokenizer, out: Path) -> None:
    import torch
    from transformers import GenerationConfig

    ids = tokenizer.convert_tokens_to_ids
    model.generation_config = GenerationConfig(
        eos_token_id=[ids("<|im_end|>"), ids("<|endoftext|>")],
        pad_token_id=ids("<|endoftext|>"),
        do_sample=False,
    )
    model.to(torch.bfloat16).save_pretrained(out)
    save_processor(processor, out)


def build_qwen2_vl(out: Path) -> None:
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    tokenizer = build_tokenizer()
    config = Qwen2VLConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            num_heads=2,
            mlp_ratio=2,
            hidden_size=64,  # Qwen2-VL: the merger's OUTPUT width (= text hidden size)
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
        ),
        tie_word_embeddings=False,
        initializer_range=0.2,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(0)
    _save(Qwen2VLForConditionalGeneration(config), _processor(QWEN2_VL, tokenizer), tokenizer, out)


def build_qwen2_5_vl(out: Path) -> None:
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer()
    config = Qwen2_5_VLConfig(
        text_config=_text_config(tokenizer),
        vision_config=dict(
            depth=2,
            hidden_size=32,  # Qwen2.5-VL: the ViT width ...
            intermediate_size=64,
            out_hidden_size=64,  # ... and the merger output (= text hidden size)
            num_heads=2,
            patch_size=PATCH,
            temporal_patch_size=TEMPORAL_PATCH,
            spatial_merge_size=MERGE,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        tie_word_embeddings=False,
        initializer_range=0.2,
        **_token_ids(tokenizer),
    )
    torch.manual_seed(0)
    _save(Qwen2_5_VLForConditionalGeneration(config), _processor(QWEN2_5_VL, tokenizer), tokenizer, out)
