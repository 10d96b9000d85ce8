"""Tiny checkpoints of the Qwen3-VL lineage: Qwen3-VL (deepstack mergers), Qwen3-VL-MoE (fused experts),
Qwen3.5 (Gated DeltaNet layers beside full attention) and Qwen3.5-MoE (both, plus a shared expert).

All share 16-pixel patches merged 2x2 (32x32 pixels per token), Qwen3VLProcessor and ChatML.
"""

from __future__ import annotations

from pathlib import Path

from vlmtune.model.families import QWEN3_VL
from vlmtune.model.processing import image_only_processor_class
from vlmtune.model.tiny.common import save, seed, text_config
from vlmtune.model.tiny.tokenizer import build_tokenizer

PATCH, MERGE, TEMPORAL_PATCH = 16, 2, 2
MIN_PIXELS, MAX_PIXELS = 64 * 64, 256 * 256  # 4 to 64 tokens per image

# Qwen/Qwen3-VL-*-Instruct: ChatML without a default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' or 'video' in part -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def _qwen3_tokenizer():
    return build_tokenizer(
        eos="<|im_end|>",
        pad="<|endoftext|>",
        special_tokens=("<|im_start|>",),
        named_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=QWEN3_VL_CHAT_TEMPLATE,
    )


def _build(out: Path, family, classes: str, text_overrides: dict, deepstack: bool, after_init=None) -> None:
    """One builder for the Qwen3-VL lineage: ``classes`` is the transformers prefix (Qwen3VL,
    Qwen3VLMoe, Qwen3_5, Qwen3_5Moe); the towers, processor and template are shared."""
    import transformers
    from transformers import Qwen2VLImageProcessorPil

    config_cls = getattr(transformers, f"{classes}Config")
    text_cls = getattr(transformers, f"{classes}TextConfig")
    vision_cls = getattr(transformers, f"{classes}VisionConfig")
    model_cls = getattr(transformers, f"{classes}ForConditionalGeneration")
    tokenizer = _qwen3_tokenizer()
    text = text_cls(**text_config(tokenizer, **text_overrides))
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=text.hidden_size,
        num_position_embeddings=64,
    )
    if deepstack:
        vision["deepstack_visual_indexes"] = [0]
    config = config_cls(
        text_config=text,
        vision_config=vision_cls(**vision),
        image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id,
        vision_start_token_id=tokenizer.vision_start_token_id,
        vision_end_token_id=tokenizer.vision_end_token_id,
        tie_word_embeddings=False,
    )
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
        patch_size=PATCH,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=MERGE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor_class(family)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN3_VL_CHAT_TEMPLATE
    )
    seed()
    model = model_cls(config)
    if after_init is not None:
        after_init(model, config)
    save(model, processor, out, ("<|im_end|>", "<|endoftext|>"))


# interleaved M-RoPE; sum(mrope_section) = rotary dims / 2
_MROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [2, 3, 3],
    "mrope_interleaved": True,
}
# Qwen3.5 rotates a quarter of each head (partial_rotary_factor 0.25 released): 16 * 0.5 / 2 = 4 here.
_MROPE_PARTIAL = {**_MROPE, "mrope_section": [2, 1, 1], "partial_rotary_factor": 0.5}
# Gated DeltaNet sizes: 2 key heads, 4 value heads of 16 (in_proj_qkv: 64 -> 128, out_proj: 64 -> 64),
# and one layer of each kind (released: three linear-attention layers per full-attention one).
_DELTANET = dict(
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    layer_types=["linear_attention", "full_attention"],
)
# Four experts of width 64, two per token (in_features 64 everywhere: bitsandbytes' CPU path).
_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)


def _spread_experts(model, config) -> None:
    """transformers initialises fused experts like Linears only where it knows them: make sure every
    expert and router holds random values (a zero expert would learn nothing and hide LoRA bugs)."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." in name or name.endswith("mlp.gate.weight"):
                param.normal_(std=config.get_text_config().initializer_range)


def build_qwen3_vl(out: Path) -> None:
    _build(out, QWEN3_VL, "Qwen3VL", {"rope_parameters": _MROPE}, deepstack=True)


def build_qwen3_vl_moe(out: Path) -> None:
    from vlmtune.model.families import QWEN3_VL_MOE

    _build(out, QWEN3_VL_MOE, "Qwen3VLMoe", {"rope_parameters": _MROPE, **_EXPERTS}, deepstack=True,
           after_init=_spread_experts)  # fmt: skip


def build_qwen3_5(out: Path) -> None:
    from vlmtune.model.families import QWEN3_5

    _build(out, QWEN3_5, "Qwen3_5", {"rope_parameters": _MROPE_PARTIAL, **_DELTANET}, deepstack=False)


def build_qwen3_5_moe(out: Path) -> None:
    from vlmtune.model.families import QWEN3_5_MOE

    overrides = {
        "rope_parameters": _MROPE_PARTIAL,
        **_DELTANET,
        **_EXPERTS,
        "shared_expert_intermediate_size": 64,
    }
    _build(out, QWEN3_5_MOE, "Qwen3_5Moe", overrides, deepstack=False, after_init=_spread_experts)
