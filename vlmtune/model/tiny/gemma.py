"""Tiny Gemma 3 and PaliGemma checkpoints (SigLIP tower, Gemma decoder, tied embeddings).

Gemma 3 writes <start_of_image> in the text; its processor expands it into
"\\n\\n<start_of_image>" + <image_soft_token> x mm_tokens_per_image + "<end_of_image>\\n\\n".
PaliGemma is a prefix-LM: image tokens, <bos>, the prompt and "\\n" attend bidirectionally, the
answer causally (token_type_ids 0 / 1).
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import PALIGEMMA_CHAT_TEMPLATE
from vlmtune.model.tiny.common import save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

IMAGE_SIZE, PATCH = 32, 8  # 16 SigLIP patches
GEMMA3_TOKENS_PER_IMAGE = 4  # pooled 4x from 16 patches (released: 4096 -> 256)

# google/gemma-3-*-it: <start_of_turn>user / model, system text folded into the first user turn,
# texts trimmed. bos_token is part of the template AND added by the tokenizer, as upstream.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = (messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text']) + '\n\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _siglip():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(**vision_config(image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False))


def build_gemma3(out: Path) -> None:
    import torch
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        Gemma3TextConfig,
    )

    tokenizer = build_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        special_tokens=("<start_of_turn>", "<end_of_turn>"),
        named_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
        add_bos=True,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    text = Gemma3TextConfig(
        **text_config(tokenizer, sliding_window=64, query_pre_attn_scalar=16, tie_word_embeddings=True)
    )
    config = Gemma3Config(
        text_config=text,
        vision_config=_siglip(),
        mm_tokens_per_image=GEMMA3_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.boi_token_id,
        eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id,
        tie_word_embeddings=True,
        initializer_range=0.2,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=GEMMA3_TOKENS_PER_IMAGE,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    seed()
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros (released checkpoints hold trained values):
    # image features would be all zero and the vision tower would get no gradient.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(std=config.initializer_range)
    save(model, processor, out, ("<end_of_turn>", "<eos>"))


def build_paligemma(out: Path) -> None:
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
    )

    tokenizer = build_tokenizer(
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        unk="<unk>",
        named_tokens={"image_token": "<image>"},
        chat_template=PALIGEMMA_CHAT_TEMPLATE,
    )
    image_processor = SiglipImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    image_processor.image_seq_length = (IMAGE_SIZE // PATCH) ** 2  # PaliGemmaProcessor reads it
    # The processor adds 1024 <locXXXX> and 128 <segXXX> tokens to the tokenizer: build it first.
    processor = PaliGemmaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=PALIGEMMA_CHAT_TEMPLATE
    )
    text = GemmaConfig(**text_config(tokenizer, num_key_value_heads=1, tie_word_embeddings=True))
    config = PaliGemmaConfig(
        vision_config=_siglip(),
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vocab_size=len(tokenizer),
        projection_dim=text.hidden_size,
        hidden_size=text.hidden_size,
        tie_word_embeddings=True,
    )
    seed()
    save(PaliGemmaForConditionalGeneration(config), processor, out, ("<eos>",))
