"""Tiny Pixtral (a `llava` checkpoint with a Pixtral vision tower) and Mistral3 checkpoints.

Both use PixtralProcessor: each image becomes rows of [IMG] tokens, each row closed by
[IMG_BREAK] and the last by [IMG_END]. Mistral3 merges 2x2 patches before the projector.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import MISTRAL3, PIXTRAL
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import content, save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

LONGEST_EDGE = 64  # images fit in 64x64: at most 4x4 [IMG] tokens

# Mistral's [INST] format (mistral-community/pixtral-12b, Mistral-Small-3.1). Upstream puts the
# system prompt into the LAST user turn, which moves as the conversation grows; here it goes into
# the first one, so every prefix of a conversation renders as a prefix of the whole.
PIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] if messages[0]['content'] is string "
    "else messages[0]['content'][0]['text'] -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system = none -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '[INST]' }}"
    "{%- if loop.first and system is not none -%}{{ system + '\n\n' }}{%- endif -%}"
    + content("[IMG]")
    + "{{ '[/INST]' }}"
    "{%- else -%}" + content("") + "{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)

# Mistral-Small-3.1: the system prompt has its own tokens at the start.
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '[SYSTEM_PROMPT]' }}" + content("") + "{{ '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST]' }}" + content("[IMG]") + "{{ '[/INST]' }}"
    "{%- else -%}" + content("") + "{{ eos_token }}{%- endif -%}"
    "{%- endfor -%}"
)


def _tokenizer(template: str):
    return build_tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        special_tokens=(
            "[INST]",
            "[/INST]",
            "[IMG_BREAK]",
            "[IMG_END]",
            "[SYSTEM_PROMPT]",
            "[/SYSTEM_PROMPT]",
        ),
        named_tokens={"image_token": "[IMG]"},
        chat_template=template,
    )


def _parts(family, template: str, patch: int, merge: int):
    from transformers import MistralConfig, PixtralImageProcessorPil, PixtralVisionConfig

    tokenizer = _tokenizer(template)
    vision = PixtralVisionConfig(**vision_config(image_size=LONGEST_EDGE, patch_size=patch))
    text = MistralConfig(**text_config(tokenizer, sliding_window=None))
    image_processor = PixtralImageProcessorPil(
        size={"longest_edge": LONGEST_EDGE}, patch_size={"height": patch, "width": patch}
    )
    processor = image_only_processor_class(family)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=merge,
        chat_template=template,
    )
    return tokenizer, vision, text, processor


def build_pixtral(out: Path) -> None:
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    tokenizer, vision, text, processor = _parts(PIXTRAL, PIXTRAL_CHAT_TEMPLATE, patch=16, merge=1)
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    seed()
    save(LlavaForConditionalGeneration(config), processor, out, ("</s>",))


def build_mistral3(out: Path) -> None:
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    tokenizer, vision, text, processor = _parts(MISTRAL3, MISTRAL3_CHAT_TEMPLATE, patch=8, merge=2)
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    seed()
    save(Mistral3ForConditionalGeneration(config), processor, out, ("</s>",))
