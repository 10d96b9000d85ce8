"""Tiny Llava-1.5, LLaVA-NeXT and LLaVA-OneVision checkpoints.

Llava-1.5 and NeXT pair a CLIP tower (whose CLS token the "default" feature strategy drops, so the
processor needs num_additional_image_tokens=1) with a Llama/Mistral decoder; OneVision pairs SigLIP
(no CLS, "full" strategy) with Qwen2. NeXT and OneVision tile the image over a grid of pinpoints.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import LLAVA_ONEVISION
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import content, save, seed, text_config, vision_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

IMAGE_SIZE, PATCH = 28, 14  # 2x2 patches: 4 image tokens per tile
PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]

# Vicuna v1 format of llava-hf/llava-1.5-*: "USER: <image>\n... ASSISTANT: answer</s>". The
# released template renders the images of a turn first; it is followed here, plus string content
# and an end-of-sequence after each answer so the model learns to stop.
LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' }}" + content("<image>\n") + "{{ ' ' }}"
    "{%- else -%}{{ 'ASSISTANT: ' }}" + content("") + "{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)

# Mistral [INST] format of llava-hf/llava-v1.6-mistral-7b-hf.
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ '<<SYS>>\n' }}" + content("") + "{{ '\n<</SYS>>\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' }}" + content("<image>\n") + "{{ ' [/INST]' }}"
    "{%- else -%}{{ ' ' }}" + content("") + "{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)

# ChatML of llava-hf/llava-onevision-qwen2-*-ov-hf, with the newline after the role that keeps
# the generation prompt a prefix of the rendered answer.
CHATML_IMAGE_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}" + content("<image>\n") + "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _llama_tokenizer(template: str, specials: tuple[str, ...] = ()):
    return build_tokenizer(
        bos="<s>",
        eos="</s>",
        pad="<pad>",
        unk="<unk>",
        special_tokens=specials,
        named_tokens={"image_token": "<image>"},
        add_bos=True,
        chat_template=template,
    )


def _clip():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(**vision_config(image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=32))


def build_llava(out: Path) -> None:
    from transformers import (
        CLIPImageProcessorPil,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _llama_tokenizer(LLAVA_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=_clip(),
        text_config=LlamaConfig(**text_config(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    seed()
    save(LlavaForConditionalGeneration(config), processor, out, ("</s>",))


def build_llava_next(out: Path) -> None:
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessorPil,
        LlavaNextProcessor,
        MistralConfig,
    )

    tokenizer = _llama_tokenizer(LLAVA_NEXT_CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=_clip(),
        text_config=MistralConfig(**text_config(tokenizer, sliding_window=None)),
        image_token_index=tokenizer.image_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH) ** 2,
        tie_word_embeddings=False,
    )
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=PINPOINTS,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_NEXT_CHAT_TEMPLATE,
    )
    seed()
    save(LlavaNextForConditionalGeneration(config), processor, out, ("</s>",))


def build_llava_onevision(out: Path) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessorPil,
        Qwen2Config,
        SiglipVisionConfig,
    )

    tokenizer = build_tokenizer(
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special_tokens=("<|im_start|>",),
        named_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **vision_config(image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False)
        ),
        text_config=Qwen2Config(**text_config(tokenizer)),
        image_token_index=tokenizer.image_token_id,
        video_token_index=tokenizer.video_token_id,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        tie_word_embeddings=False,
    )
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_grid_pinpoints=PINPOINTS
    )
    processor = image_only_processor_class(LLAVA_ONEVISION)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=CHATML_IMAGE_TEMPLATE,
    )
    seed()
    save(LlavaOnevisionForConditionalGeneration(config), processor, out, ("<|im_end|>",))
