"""Pieces every tiny builder shares: layer sizes, seeding, saving, and chat-template fragments.

Sizes follow FACTS.md: text hidden 64 with 2 layers (every quantized Linear has in_features >= 64,
which bitsandbytes' CPU path needs), vision hidden 32 with 2 layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmtune.model.processing import save_processor

TEXT_HIDDEN = 64
VISION_HIDDEN = 32

# Jinja fragments. A content list renders images and texts in order; string content as is.
# ``IMAGE`` is replaced by each family's placeholder.
CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}{{ IMAGE }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)


def content(image: str) -> str:
    """The CONTENT fragment with ``image`` as the placeholder of one image."""
    return CONTENT.replace("IMAGE", repr(image))


def text_config(tokenizer: Any, **overrides: Any) -> dict:
    """A 64-wide, 2-layer decoder config whose special ids come from ``tokenizer``."""
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        # Wider than the released 0.02 so a LoRA on random weights can fit the demo data (see qwen.py).
        initializer_range=0.2,
    )
    config.update(overrides)
    return config


def vision_config(**overrides: Any) -> dict:
    """A 32-wide, 2-layer vision encoder (keys of CLIP/SigLIP-style configs)."""
    config = dict(
        hidden_size=VISION_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    config.update(overrides)
    return config


def seed() -> None:
    import torch

    torch.manual_seed(0)


def save(model: Any, processor: Any, out: Path, stop_tokens: tuple[str, ...]) -> None:
    """Save weights (bf16), a greedy generation config that stops on ``stop_tokens``, and the processor."""
    import torch
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    ids = [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=ids,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.to(torch.bfloat16).save_pretrained(out)
    save_processor(processor, out)
