"""A byte-level BPE vocabulary trained in-process on a small corpus: no download, no OOV.

``train_byte_bpe`` gives the raw vocabulary (Qwen's builder wraps it in Qwen2Tokenizer);
``build_tokenizer`` wraps it in a fast tokenizer with a family's special tokens, named tokens
(``tokenizer.image_token`` and friends, which processors read) and chat template.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# Words of the demo and test data, so tiny tokenizers encode them in few tokens.
CORPUS = [
    "You are a helpful assistant.",
    "What color is the shape? The shape is red. The square is green. The circle is blue.",
    "What shape is in the image? It is a circle. It is a square. It is a triangle.",
    "How many images are there? There are two images. The first one is red and the second one is blue.",
    "Describe the image. A yellow background with a black dot in the middle.",
    "Answer the question about the picture in one short sentence.",
    "What color is the background? Which shape is bigger? left right top bottom small large",
    "red green blue yellow purple orange white black gray circle square triangle",
    "the quick brown fox jumps over the lazy dog 0 1 2 3 4 5 6 7 8 9",
    "system user assistant model image video picture photo Who What Where Why How",
]

# Role names and the newline runs chat templates and processors write, so build_tokenizer's
# tokenizers merge them as real ones do (Gemma 3's processor writes "\n\n" around each image,
# which then merges with the newline before it: the collator must cope).
CHAT_CORPUS = [
    "user\nassistant\nsystem\nmodel\n",
    "USER: ASSISTANT: User: Assistant: System: [INST] [/INST]",
    *["\n\n", "\n\n\n", "\n\n\n\n"] * 8,
]

# Qwen2's pre-tokenizer split (the same regex as the real checkpoints' tokenizer.json).
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def _pre_tokenizer():
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def train_byte_bpe(
    first_token: str, vocab_size: int = 400, corpus: list[str] = CORPUS
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE trained on ``corpus``; ``first_token`` gets id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[first_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return state["vocab"], merges


def build_tokenizer(
    *,
    eos: str,
    pad: str,
    bos: str | None = None,
    unk: str | None = None,
    special_tokens: Sequence[str] = (),
    named_tokens: Mapping[str, str] | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
) -> Any:
    """A fast byte-level BPE tokenizer with a family's special tokens.

    ``pad`` gets id 0. ``named_tokens`` ({"image_token": "<image>", ...}) become attributes
    (``tokenizer.image_token``, ``tokenizer.image_token_id``) that survive saving, as in the real
    checkpoints. ``add_bos`` prepends ``bos`` on every encode, as Llama and Gemma tokenizers do.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    named = dict(named_tokens or {})
    specials = list(dict.fromkeys(t for t in (pad, bos, eos, unk, *special_tokens, *named.values()) if t))
    vocab, merges = train_byte_bpe(pad, corpus=CORPUS + CHAT_CORPUS)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if add_bos:
        if bos is None:
            raise ValueError("add_bos needs a bos token")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    kwargs: dict[str, Any] = dict(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        padding_side="right",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    if named:
        kwargs["extra_special_tokens"] = named
    tokenizer = PreTrainedTokenizerFast(**kwargs)
    plain = [t for t in special_tokens if t not in named.values()]
    if plain:
        tokenizer.add_special_tokens({"additional_special_tokens": plain}, replace_extra_special_tokens=False)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer
