"""`export --verify`: does the served model answer like the trained one? Greedy answers, side by side.

For a GGUF export: llama.cpp (llama-cpp-python, the language GGUF with its mmproj) against the merged
model in transformers, on the run's eval samples. For a merged export: the merged 16-bit model against
base + adapter (after/export.py scores both). Either way the report gives the agreement rate and, for
each disagreement, the first token where the answers part.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vlmtune.after.export import ExportError
from vlmtune.after.trained import TrainedRun

N_CTX = 4096  # llama.cpp's context for one eval prompt and its answer


def eval_items(trained: TrainedRun) -> list:
    from vlmtune.after import evaluate

    data = trained.recipe.data
    if not data.eval:
        raise ExportError(
            f"--verify compares answers on the run's eval samples, and run {trained.run.path} has none "
            "(its recipe's data.eval is empty)",
            hint="export without --verify, or train with a data.eval split",
        )
    return evaluate.load_items(data.eval, data, None)[0]


def verify(hf: Path, model: Path, mmproj: Path, trained: TrainedRun) -> dict:
    """llama.cpp's greedy answers vs transformers' on the merged model, on data.eval."""
    from vlmtune.after import evaluate
    from vlmtune.after.trained import load_export

    items = eval_items(trained)
    reference = load_export(hf, device="cpu", dtype="float32")
    expected = evaluate.answers(reference.model, reference.processor, items, evaluate.MAX_NEW_TOKENS)
    limits = image_token_limits(reference.processor, reference.family)
    served = llama_cpp_answers(model, mmproj, items, evaluate.MAX_NEW_TOKENS, limits)
    indices = [item.index for item in items]
    expected, served = [_whole_characters(a) for a in expected], [_whole_characters(a) for a in served]
    result = comparison(
        reference.processor.tokenizer, indices, expected, served, ("transformers", "llama_cpp")
    )
    return {**result, "llama_cpp_image_tokens": {"min": limits[0], "max": limits[1]}}


def image_token_limits(processor: Any, family: Any) -> tuple[int, int]:
    """The fewest and most tokens an image may become under the processor as trained (its pixel budget);
    (-1, -1): llama.cpp's own limits, for a family without a pixel budget.

    llama.cpp keeps its own limits per projector (at least 8 tokens for Qwen2-VL), so without these it
    would resize a small image that transformers keeps as it is, and the two would see different pixels.
    """
    settings = family.image_settings(processor)
    if not (settings.min_pixels and settings.max_pixels):
        return (-1, -1)
    per_token = (settings.patch_size * settings.merge_size) ** 2
    return (max(1, settings.min_pixels // per_token), settings.max_pixels // per_token)


class _TokenLimitedMtmd:
    """llama-cpp-python's mtmd bindings with the context defaults set to the image token limits: its chat
    handler builds the mtmd context from ``mtmd_context_params_default()`` and offers no other way in."""

    def __init__(self, module: Any, limits: tuple[int, int]):
        self._module, self._limits = module, limits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)

    def mtmd_context_params_default(self) -> Any:
        params = self._module.mtmd_context_params_default()
        params.image_min_tokens, params.image_max_tokens = self._limits
        return params


def _whole_characters(text: str) -> str:
    """The answer without U+FFFD: transformers decodes a token holding part of a UTF-8 character as U+FFFD
    where llama-cpp-python drops those bytes, so the same tokens would read as different answers."""
    return text.replace("\ufffd", "")


def llama_cpp_answers(
    model: Path, mmproj: Path, items: list, max_new_tokens: int, limits: tuple[int, int] = (-1, -1)
) -> list[str]:
    """Greedy answers from llama.cpp: the GGUF's own chat template, images through the mmproj (mtmd)."""
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MTMDChatHandler

    handler = MTMDChatHandler(clip_model_path=str(mmproj), verbose=False)
    handler._mtmd_cpp = _TokenLimitedMtmd(handler._mtmd_cpp, limits)
    llama = Llama(str(model), chat_handler=handler, n_ctx=N_CTX, n_threads=1, verbose=False, seed=0)
    answers = []
    for item in items:
        with native_output_silenced():  # mtmd prints every prompt piece and image slice
            result = llama.create_chat_completion(
                messages=openai_messages(item),
                max_tokens=max_new_tokens,
                temperature=0.0,  # greedy
                top_k=1,
                repeat_penalty=1.0,  # llama-cpp-python's default 1.1 would change the answer
            )
        answers.append((result["choices"][0]["message"]["content"] or "").strip())
    llama.close()
    return answers


@contextmanager
def native_output_silenced() -> Iterator[None]:
    """Point file descriptors 1 and 2 at /dev/null while llama.cpp's C code runs (it writes to them directly)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def openai_messages(item: Any) -> list[dict]:
    """The eval prompt with each image part as a PNG data URL, in order (how llama-cpp-python takes images)."""
    from vlmtune.data import open_image

    images = iter(item.images)
    messages = []
    for message in item.messages:
        content = message["content"]
        if isinstance(content, list):
            content = [_part(part, images, open_image) for part in content]
        messages.append({**message, "content": content})
    return messages


def _part(part: dict, images, open_image) -> dict:
    if part["type"] != "image":
        return part
    buffer = io.BytesIO()
    open_image(next(images)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    return {"type": "image_url", "image_url": {"url": url}}


def comparison(
    tokenizer: Any, indices: list[int], first: list[str], second: list[str], names: tuple[str, str]
) -> dict:
    """Agreement rate of two answer lists (by sample index) and, per disagreement, the first differing token."""
    rows = []
    for index, a, b in zip(indices, first, second, strict=True):
        if a != b:
            rows.append(
                {"index": index, names[0]: a, names[1]: b, **first_difference(tokenizer, a, b, names)}
            )
    agreeing = len(indices) - len(rows)
    return {
        "compared": f"{names[0]} vs {names[1]}",
        "n": len(indices),
        "agreeing": agreeing,
        "agreement": agreeing / len(indices) if indices else 1.0,
        "disagreements": rows,
        "answers": [
            {"index": index, names[0]: a, names[1]: b}
            for index, a, b in zip(indices, first, second, strict=True)
        ],
    }


def first_difference(tokenizer: Any, a: str, b: str, names: tuple[str, str]) -> dict:
    """The position of the first token where ``a`` and ``b`` part, and that token on each side."""
    ids_a = tokenizer.encode(a, add_special_tokens=False)
    ids_b = tokenizer.encode(b, add_special_tokens=False)
    at = next(
        (i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y), min(len(ids_a), len(ids_b))
    )

    def token(ids: list[int]) -> str | None:
        return tokenizer.decode([ids[at]]) if at < len(ids) else None  # None: that answer ended there

    return {"first_differing_token": at, f"{names[0]}_token": token(ids_a), f"{names[1]}_token": token(ids_b)}


def merged_comparison(folder: Path, scored: dict) -> dict:
    """--merge --verify: the merged 16-bit model against base + adapter, from the export's own scores."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    rows = scored["predictions"]
    indices = [r["index"] for r in rows]
    return comparison(tokenizer, indices, [r["adapter"] for r in rows], [r["export"] for r in rows],
                      ("base_plus_adapter", "merged"))  # fmt: skip
