"""Tiny Gemma 4 checkpoint: a 2-layer Gemma 4 decoder (one sliding, one full-attention layer; each with the
26B-A4B's dense MLP beside 4 fused experts) under a 2-layer Gemma 4 vision encoder whose patches are pooled
3x3 into soft tokens.

Gemma 4 writes <|image|> in the text; its processor expands it into
"<|image>" + <|image|> x soft tokens + "<image|>", the soft tokens counted from the image's size
(an aspect-preserving resize to at most max_soft_tokens x 9 patches of 16 pixels). The processor also
needs an audio feature extractor (built here; vlmtune trains on images) and a video processor (left
out, as for Qwen: vlmtune.model.processing).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.tiny.common import save, seed, text_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

MAX_SOFT_TOKENS = 140  # released default 280; the smallest setting is 70 (a pixel budget lowers it)

# google/gemma-4-*-it: <|turn>user / model turns closed by <turn|>, system turn first when given.
GEMMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<turn|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)


def build_gemma4(out: Path) -> None:
    import torch
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4ImageProcessorPil,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    from vlmtune.model.families import GEMMA4
    from vlmtune.model.processing import image_only_processor_class

    tokenizer = build_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        special_tokens=("<|turn>", "<turn|>"),
        named_tokens={
            "image_token": "<|image|>",
            "boi_token": "<|image>",
            "eoi_token": "<image|>",
            "audio_token": "<|audio|>",
            "boa_token": "<|audio>",
            "eoa_token": "<audio|>",
        },
        add_bos=True,
        chat_template=GEMMA4_CHAT_TEMPLATE,
    )
    text = Gemma4TextConfig(
        **text_config(
            tokenizer,
            hidden_activation="gelu_pytorch_tanh",
            sliding_window=64,
            layer_types=["sliding_attention", "full_attention"],
            global_head_dim=16,  # released: 512 on the full-attention layers
            hidden_size_per_layer_input=0,  # the 26B/31B checkpoints have no per-layer inputs
            vocab_size_per_layer_input=len(tokenizer),
            tie_word_embeddings=True,
            # the 26B-A4B layout: a dense MLP and fused experts side by side, a Linear router
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=64,
        )
    )
    vision = Gemma4VisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, head_dim=16, patch_size=16, pooling_kernel_size=3, position_embedding_size=64,
    )  # fmt: skip
    config = Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=None,
        boi_token_id=tokenizer.boi_token_id,
        eoi_token_id=tokenizer.eoi_token_id,
        image_token_id=tokenizer.image_token_id,
        boa_token_id=tokenizer.boa_token_id,
        eoa_token_index=tokenizer.eoa_token_id,
        audio_token_id=tokenizer.audio_token_id,
        video_token_id=tokenizer.image_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    image_processor = Gemma4ImageProcessorPil(max_soft_tokens=MAX_SOFT_TOKENS)
    processor = image_only_processor_class(GEMMA4)(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA4_CHAT_TEMPLATE,
        image_seq_length=MAX_SOFT_TOKENS,
    )
    seed()
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():  # what transformers zeroes would cut the image off the text (see gemma.py)
        for name, param in model.named_parameters():
            if name.startswith("model.embed_vision.") and param.dim() > 1 and not param.any():
                param.normal_(std=0.2)
        for name, param in model.named_parameters():  # fused experts: random, as trained ones are
            if ".experts." in name:
                param.normal_(std=0.2)
    save(model, processor, out, ("<turn|>", "<eos>"))
