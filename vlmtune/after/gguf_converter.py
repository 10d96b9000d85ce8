"""Run llama.cpp's convert_hf_to_gguf.py in this process (``python -m vlmtune.after.gguf_converter``).

    python -m vlmtune.after.gguf_converter LLAMA_CPP_DIR PRE_TOKENIZER MODEL_DIR [converter options]

The converter itself does the work, unchanged, with one exception: when it does not recognise the
tokenizer's BPE pre-tokenizer by its hash (it knows released vocabularies only) and PRE_TOKENIZER is
given, that name is used. export_gguf.matching_pre_tokenizer passes it only for a tokenizer whose split
regex is exactly that pre-tokenizer's; an empty PRE_TOKENIZER keeps the converter's refusal.
Run as a separate process because the converter edits sys.path and the logging set-up.
"""

from __future__ import annotations

import runpy
import sys


def main(argv: list[str]) -> None:
    converter, pre_tokenizer, *args = argv
    sys.path.insert(0, converter)
    if pre_tokenizer:
        _fall_back_to(pre_tokenizer)
    sys.argv = [f"{converter}/convert_hf_to_gguf.py", *args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def _fall_back_to(name: str) -> None:
    from conversion import base

    recognised = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return recognised(self, tokenizer)
        except NotImplementedError:  # "BPE pre-tokenizer was not recognized"
            return name

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre


if __name__ == "__main__":
    main(sys.argv[1:])
