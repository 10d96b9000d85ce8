"""Tiny GLM-4.1V, GLM-4.6V and GLM-4.5V checkpoints: a 14-pixel-patch vision tower merged 2x2 (Qwen-like,
with image_grid_thw), a GLM-4 decoder whose MLP fuses gate and up (mlp.gate_up_proj); GLM-4.5V's decoder
is GLM-4.5-Air's instead: a dense first layer, then mixtures of fused experts with a shared expert.

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


def _build(
    out: Path,
    family,
    config_cls: str,
    text_cls: str = "Glm4vTextConfig",
    text_overrides: dict | None = None,
    after_init=None,
) -> None:
    import transformers
    from transformers import Glm4vImageProcessorPil, Glm4vVisionConfig

    tokenizer = build_tokenizer(
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        special_tokens=("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_video|>",
                        "<|end_of_video|>"),
        named_tokens={"image_token": "<|image|>", "video_token": "<|video|>",
                      "boi_token": "<|begin_of_image|>", "eoi_token": "<|end_of_image|>"},
        chat_template=GLM4V_CHAT_TEMPLATE,
    )  # fmt: skip
    text = getattr(transformers, text_cls)(
        **text_config(
            tokenizer,
            # M-RoPE over (t, h, w): sum(mrope_section) = rotary dims / 2 (GLM rotates half of each head)
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1],
                             "partial_rotary_factor": 0.5},
            **(text_overrides or {}),
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
    model = model_cls(config)
    if after_init is not None:
        after_init(model, config)
    save(model, processor, out, ("<|endoftext|>", "<|user|>"))


def build_glm4v(out: Path) -> None:
    from vlmtune.model.families import GLM4V

    _build(out, GLM4V, "Glm4vConfig")


def build_glm46v(out: Path) -> None:
    from vlmtune.model.families import GLM46V

    _build(out, GLM46V, "Glm46VConfig")


# GLM-4.5V's decoder (GLM-4.5-Air's): layer 0 dense (first_k_dense_replace), layer 1 a mixture of four
# experts of width 64, two per token, beside one shared expert (in_features 64: bitsandbytes' CPU path).
_GLM_MOE = dict(
    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
    first_k_dense_replace=1, n_group=1, topk_group=1,
)  # fmt: skip


def _random_experts(model, config) -> None:
    """The router starts at zero (transformers' init): every token would pick the same experts by tie.
    Give the router and the fused experts random values, as a released checkpoint has."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                param.normal_(std=config.get_text_config().initializer_range)


def build_glm4v_moe(out: Path) -> None:
    from vlmtune.model.families import GLM4V_MOE

    _build(out, GLM4V_MOE, "Glm4vMoeConfig", "Glm4vMoeTextConfig", _GLM_MOE, after_init=_random_experts)
