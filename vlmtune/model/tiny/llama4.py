"""Tiny Llama 4 checkpoint (Llama-4-Scout's layout): tiles of 56 pixels, 14-pixel patches pixel-shuffled
four to one (4 <|patch|> tokens per tile), up to 4 tiles plus a global view; a decoder whose every layer is
a mixture of four experts (one per token, sigmoid-gated) beside a shared expert, as Scout's (Maverick
interleaves dense layers).

Attention is Llama 4's: layers with RoPE attend in chunks of attention_chunk_size tokens, every fourth layer
has no RoPE (NoPE) and attends to everything, with a temperature that grows with the position. The chunk
here is 32 tokens (8192 released) so that the tests' samples cross chunk boundaries, and layer 1 is a NoPE
layer (no_rope_layer_interval 2), so both kinds run.

The template is Llama 4's header format (<|header_start|>role<|header_end|>\\n\\n ... <|eot|>); an image is
<|image|>, which the processor expands into <|image_start|>, the tiles' <|patch|> tokens with their
<|tile_x_separator|>/<|tile_y_separator|>, <|image|>, the global view's <|patch|> tokens and <|image_end|>.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.tiny.common import content, save, seed, text_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

TILE, PATCH, MAX_TILES = 56, 14, 4
VISION_HIDDEN, SHUFFLE = 32, 0.5
PROJECTOR = 64  # the pixel-shuffle MLP's width and the vision output (4096 released)

LLAMA4_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|header_start|>' + message['role'] + '<|header_end|>\n\n' }}"
    + content("<|image|>")
    + "{{ '<|eot|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|header_start|>assistant<|header_end|>\n\n' }}{%- endif -%}"
)


def build_llama4(out: Path) -> None:
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration, Llama4Processor

    from vlmtune.model.llama4_images import processor_class

    tokenizer = build_tokenizer(
        bos="<|begin_of_text|>",
        eos="<|eot|>",
        pad="<|finetune_right_pad|>",
        special_tokens=("<|header_start|>", "<|header_end|>", "<|end_of_text|>", "<|eom|>", "<|image_start|>",
                        "<|image_end|>", "<|patch|>", "<|tile_x_separator|>", "<|tile_y_separator|>"),
        named_tokens={"image_token": "<|image|>"},
        add_bos=True,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )  # fmt: skip
    text = text_config(
        tokenizer,
        intermediate_size=64,  # each routed and the shared expert (in_features 64: bitsandbytes' CPU path)
        num_local_experts=4,
        num_experts_per_tok=1,
        interleave_moe_layer_step=1,  # every layer a MoE, as Scout
        no_rope_layer_interval=2,
        attention_chunk_size=32,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )
    vision = dict(
        hidden_size=VISION_HIDDEN, intermediate_size=int(VISION_HIDDEN / SHUFFLE**2), num_hidden_layers=2,
        num_attention_heads=2, image_size=TILE, patch_size=PATCH, pixel_shuffle_ratio=SHUFFLE,
        projector_input_dim=PROJECTOR, projector_output_dim=PROJECTOR, vision_output_dim=PROJECTOR,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )  # fmt: skip
    config = Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=tokenizer.convert_tokens_to_ids("<|image_start|>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<|image_end|>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<|patch|>"),  # the feature token, as released
        tie_word_embeddings=False,
    )
    image_processor = processor_class()(size={"height": TILE, "width": TILE}, max_patches=MAX_TILES)
    processor = Llama4Processor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, pixel_shuffle_ratio=SHUFFLE,
        chat_template=LLAMA4_CHAT_TEMPLATE,
    )  # fmt: skip
    seed()
    model = Llama4ForConditionalGeneration(config)
    with torch.no_grad():  # fused experts get random values like the Linears (transformers' init may not)
        for name, param in model.named_parameters():
            if ".experts." in name:
                param.normal_(std=config.text_config.initializer_range)
    save(model, processor, out, ("<|eot|>", "<|end_of_text|>"))
