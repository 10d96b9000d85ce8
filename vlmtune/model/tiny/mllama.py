"""Tiny Llama 3.2 Vision (Mllama) checkpoint.

One <|image|> token per image in the text; the image tiles reach the decoder through
cross-attention layers (cross_attn.q_proj ...) placed between its self-attention layers.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.tiny.common import save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

IMAGE_SIZE, PATCH, MAX_TILES = 28, 14, 4

# meta-llama/Llama-3.2-11B-Vision-Instruct's header format. bos_token is part of the template AND
# added by the tokenizer, as upstream. (The released template also writes a dated system block for
# text-only conversations; it is left out here.)
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ '<|image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif -%}"
)


def build_mllama(out: Path) -> None:
    import torch
    from transformers import (
        MllamaConfig,
        MllamaForConditionalGeneration,
        MllamaImageProcessorPil,
        MllamaProcessor,
        MllamaTextConfig,
        MllamaVisionConfig,
    )

    tokenizer = build_tokenizer(
        bos="<|begin_of_text|>",
        eos="<|eot_id|>",
        pad="<|finetune_right_pad_id|>",
        special_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>", "<|python_tag|>"),
        named_tokens={"image_token": "<|image|>"},
        add_bos=True,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    vision = MllamaVisionConfig(
        **vision_config(
            num_global_layers=1,
            attention_heads=2,
            image_size=IMAGE_SIZE,
            patch_size=PATCH,
            max_num_tiles=MAX_TILES,
            intermediate_layers_indices=[0, 1],
            vision_output_dim=32 * 3,  # the last layer + the two intermediate ones, concatenated
        )
    )
    # Layer 1 is a cross-attention layer (the released 11B has one every 5 layers).
    text = text_config(tokenizer, cross_attention_layers=[1])
    text.pop("head_dim")
    config = MllamaConfig(
        vision_config=vision, text_config=MllamaTextConfig(**text), image_token_index=tokenizer.image_token_id
    )
    image_processor = MllamaImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES
    )
    processor = MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAMA3_CHAT_TEMPLATE
    )
    seed()
    model = MllamaForConditionalGeneration(config)
    # The cross-attention layers' tanh gates start at zero (released checkpoints hold trained
    # values): the image would not reach the text, and the vision tower would get no gradient.
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for gate in ("cross_attn_attn_gate", "cross_attn_mlp_gate"):
                if hasattr(layer, gate):
                    getattr(layer, gate).fill_(1.0)
    save(model, processor, out, ("<|eot_id|>", "<|end_of_text|>"))
