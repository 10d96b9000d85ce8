"""Tiny Idefics3 and SmolVLM checkpoints (SigLIP-like tower, pixel-shuffle connector, Llama decoder).

An image is resized so its longest edge is ``size.longest_edge``, split into tiles of
``max_image_size`` plus one global view; each tile becomes <fake_token_around_image><row_i_col_j>
followed by image_seq_len <image> tokens.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import SMOLVLM
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

TILE, PATCH, SCALE = 32, 8, 2  # 16 patches per tile, pixel-shuffled 2x2: 4 tokens per tile
LONGEST_EDGE = 2 * TILE  # up to 2x2 tiles + the global image
ROW_COL_TOKENS = tuple(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7))


def chat_template(bos: str) -> str:
    """HuggingFaceM4/Idefics3-8B-Llama3's "User:" / "Assistant:" format (SmolVLM: <|im_start|> as bos).

    ": " after the role, ":" alone when the turn opens with an image, as upstream; string content
    is accepted too.
    """
    return (
        "{{ '" + bos + "' }}"
        "{%- for message in messages -%}"
        "{{ message['role'] | capitalize }}"
        "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
        "{%- else -%}"
        "{%- if message['content'][0]['type'] == 'image' -%}{{ ':' }}{%- else -%}{{ ': ' }}{%- endif -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
        "{%- elif part['type'] == 'image' -%}{{ '<image>' }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<end_of_utterance>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
    )


def _tokenizer(bos: str, pad: str, add_bos: bool, template: str):
    return build_tokenizer(
        bos=bos,
        eos="<end_of_utterance>",
        pad=pad,
        special_tokens=("<fake_token_around_image>", "<global-img>", *ROW_COL_TOKENS),
        named_tokens={"image_token": "<image>"},
        add_bos=add_bos,
        chat_template=template,
    )


def _text(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**text_config(tokenizer))


def _image_processor_kwargs() -> dict:
    return dict(
        size={"longest_edge": LONGEST_EDGE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True
    )


def build_idefics3(out: Path) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    template = chat_template("<|begin_of_text|>")
    # Llama 3 tokenizer: adds <|begin_of_text|>, which the template writes too, as upstream.
    tokenizer = _tokenizer("<|begin_of_text|>", "<|end_of_text|>", add_bos=True, template=template)
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(**vision_config(image_size=TILE, patch_size=PATCH)),
        text_config=_text(tokenizer),
        scale_factor=SCALE,
        image_token_id=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=(TILE // PATCH) ** 2 // SCALE**2,
        chat_template=template,
    )
    seed()
    save(Idefics3ForConditionalGeneration(config), processor, out, ("<end_of_utterance>",))


def build_smolvlm(out: Path) -> None:
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
        SmolVLMVisionConfig,
    )

    template = chat_template("<|im_start|>")
    tokenizer = _tokenizer("<|im_start|>", "<|im_end|>", add_bos=False, template=template)
    config = SmolVLMConfig(
        vision_config=SmolVLMVisionConfig(**vision_config(image_size=TILE, patch_size=PATCH)),
        text_config=_text(tokenizer),
        scale_factor=SCALE,
        image_token_id=tokenizer.image_token_id,
        tie_word_embeddings=False,
    )
    processor = image_only_processor_class(SMOLVLM)(  # Idefics3Processor: see the SmolVLM record
        image_processor=SmolVLMImageProcessorPil(**_image_processor_kwargs()),
        tokenizer=tokenizer,
        image_seq_len=(TILE // PATCH) ** 2 // SCALE**2,
        chat_template=template,
    )
    seed()
    save(SmolVLMForConditionalGeneration(config), processor, out, ("<end_of_utterance>",))
