"""Tiny GLM-4.1V and GLM-4.6V checkpoints: a 14-pixel-patch vision tower merged 2x2 (Qwen-like, with
image_grid_thw), a GLM-4 decoder whose MLP fuses gate and up (mlp.gate_up_proj).

The template is GLM-4's: "[gMASK]<sop>" then "<|role|>\\n" + content per turn, images written as
<|begin_of_image|><|image|><|end_of_image|>. Answers end with no token of their own (the model stops by
writing the next role or <|endoftext|>), so vlmtune's collator appends the eos token to each answer, as
for Llava-1.5's template.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import save, seed, text_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

PATCH, MERGE, TEMPORAL_PATCH = 14, 2, 2
MIN_PIXELS, MAX_PIXELS = 56 * 56 * 2, 224 * 224 * 2  # GLM counts both temporal frames: 4 to 64 tokens

GLM4V_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def _build(out: Path, family, config_cls: str) -> None:
    import transformers
    from transformers import Glm4vImageProcessorPil, Glm4vTextConfig, Glm4vVisionConfig

    tokenizer = build_tokenizer(
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        special_tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_video|>",
                        "<|end_of_video|>"),
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>",
                      "boi_token": "<|begin_of_image|>", "eoi_token": "<|end_of_image|>"},
        chat_template=GLM4V_CHAT_TEMPLATE,
    )  # fmt: skip
    text = Glm4vTextConfig(
        **text_config(
            tokenizer,
            # M-RoPE over (t, h, w): sum(mrope_section) = rotary dims / 2 (GLM rotates half of each head)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "partial_rotary_factor": 0.5},
        )
    )  # fmt: skip
    vision = Glm4vVisionConfig(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH,
        spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL_PATCH, out_hidden_size=text.hidden_size,
        image_size=56,
    )  # fmt: skip
    config = getattr(transformers, config_cls)(
        text_config=text.to_dict(),
        vision_config=vision.to_dict(),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        image_start_token_id=tokenizer.boi_token_id,
        image_end_token_id=tokenizer.eoi_token_id,
        video_start_token_id=tokenizer.convert_tokens_to_ids("<|begin_of_video|>"),
        video_end_token_id=tokenizer.convert_tokens_to_ids("<|end_of_video|>"),
        tie_word_embeddings=False,
    )
    image_processor = Glm4vImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor_class(family)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=GLM4V_CHAT_TEMPLATE
    )
    seed()
    model_cls = getattr(transformers, config_cls.removesuffix("Config") + "ForConditionalGeneration")
    save(model_cls(config), processor, out, ("<|endoftext|>", "<|user|>"))


def build_glm4v(out: Path) -> None:
    from vlmtune.model.families import GLM4V

    _build(out, GLM4V, "Glm4vConfig")


def build_glm46v(out: Path) -> None:
    from vlmtune.model.families import GLM46V

    _build(out, GLM46V, "Glm46VConfig")
