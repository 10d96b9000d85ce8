"""Tiny LFM2-VL checkpoint (LiquidAI/LFM2-VL-1.6B's layout): a SigLIP2 (NaFlex) tower of 8-pixel patches, a
2 x 2 pixel-unshuffle projector, and an LFM2 decoder of one short-convolution layer then one attention layer.

Images are Lfm2VlImageProcessor's (vlmtune.model.lfm2_images, PIL): up to 16 tokens (64 x 64 pixels) an
image is resized whole, between 4 and 16 tokens; past twice that it is cut into 2 to 4 tiles of 32 pixels
(4 tokens each) plus its thumbnail. The template is LFM2's ChatML; an image is <image>, which the processor
expands into <|image_start|>, per tile <|img_row_R_col_C|> and its <image> tokens, <|img_thumbnail|> and the
thumbnail's, then <|image_end|>.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import LFM2_VL
from vlmtune.model.tiny.common import content, save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

PATCH, DOWNSAMPLE, TILE = 8, 2, 32
MIN_TILES, MAX_TILES = 2, 4
MIN_TOKENS, MAX_TOKENS = 4, 16

LFM2_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}" + content("<image>") + "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def build_lfm2_vl(out: Path) -> None:
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration, Lfm2VlProcessor

    from vlmtune.model.lfm2_images import processor_class

    tokenizer = build_tokenizer(
        bos="<|startoftext|>",
        eos="<|im_end|>",
        pad="<|pad|>",
        # the record's structural tokens: the image markers and every <|img_row_R_col_C|> of a released grid
        special_tokens=("<|im_start|>", *LFM2_VL.structural_tokens),
        named_tokens={"image_token": "<image>"},
        chat_template=LFM2_CHAT_TEMPLATE,
    )  # fmt: skip
    text = text_config(
        tokenizer,
        model_type="lfm2",
        layer_types=["conv", "full_attention"],  # LFM2: mostly short convolutions, a few attention layers
        block_auto_adjust_ff_dim=False,  # else the MLP width is rounded up to a multiple of 256
        norm_eps=1e-5,
    )
    # no attention-pooling head: LFM2-VL reads the patch states (released: vision_use_head false)
    vision = vision_config(
        model_type="siglip2_vision_model", patch_size=PATCH, num_patches=64, vision_use_head=False
    )
    config = Lfm2VlConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_size=64,
        downsample_factor=DOWNSAMPLE,
        tie_word_embeddings=True,  # as released
    )
    image_processor = processor_class()(
        encoder_patch_size=PATCH, downsample_factor=DOWNSAMPLE, tile_size=TILE, min_tiles=MIN_TILES,
        max_tiles=MAX_TILES, min_image_tokens=MIN_TOKENS, max_image_tokens=MAX_TOKENS,
    )  # fmt: skip
    processor = Lfm2VlProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=LFM2_CHAT_TEMPLATE
    )
    seed()
    model = Lfm2VlForConditionalGeneration(config)
    save(model, processor, out, ("<|im_end|>",))
