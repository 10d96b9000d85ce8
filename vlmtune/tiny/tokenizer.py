"""A byte-level BPE vocabulary trained in-process on a small corpus: no download, no OOV."""

from __future__ import annotations

import json

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

# Qwen2's pre-tokenizer split (the same regex as the real checkpoints' tokenizer.json).
QWEN_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def train_byte_bpe(first_token: str, vocab_size: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE; ``first_token`` gets id 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[first_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    return state["vocab"], merges
