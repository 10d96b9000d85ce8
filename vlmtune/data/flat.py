"""Flat records: one exchange (and maybe its history) spread over named columns.

- query_response: ms-swift's query/response/history/system, with the aliases its docs and its
  ``ResponsePreprocessor`` accept (matched case-insensitively), and LLaMA-Factory's alpaca
  instruction/input/output (instruction and input joined by a newline, as both projects do).
  ``history`` is a list of [question, answer] pairs (or that list written as text, as CSV holds it);
  its answers are trained too, as in both projects. Strings mark images with ``<image>``.
- columns: the columns named in data.columns (VQA, captioning); the images go before the question.

Two columns naming one thing (``query`` and ``prompt``), a list of answers, or an image-like
column vlmtune would not read are refused with a named reason, never resolved by a silent pick.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from vlmtune.data.parts import (
    BARE,
    Built,
    column_images,
    image_part,
    looks_like_images,
    split_markers,
    string_of,
    text_part,
)
from vlmtune.data.samples import SampleError

QUERY = ("query", "prompt", "input", "instruction", "question", "problem")
RESPONSE = (
    "response", "answer", "output", "targets", "target", "answer_key", "answers", "solution",
    "text", "completion", "content",
)  # fmt: skip
SYSTEM = ("system", "system_prompt")
HISTORY = ("history",)
IMAGES = ("images", "image")
ALPACA = {"instruction", "input"}  # LLaMA-Factory/ms-swift: the prompt is instruction + "\n" + input
KNOWN = {*QUERY, *RESPONSE, *SYSTEM, *HISTORY, *IMAGES}


def has_response(record: dict) -> bool:
    return any(key.lower() in RESPONSE for key in record)


def query_response(record: dict, marker: str) -> Built:
    keys = _aliases(record)
    slots: list = []
    messages: list[dict] = []
    system = _single(record, keys, SYSTEM, "system prompt", required=False)
    if system is not None:
        messages.append(
            {"role": "system", "content": split_markers(string_of(record[system], system), marker, slots)}
        )
    history = _single(record, keys, HISTORY, "history", required=False)
    if history is not None:
        for question, answer in _pairs(record[history], history):
            messages.append({"role": "user", "content": split_markers(question, marker, slots)})
            messages.append({"role": "assistant", "content": split_markers(answer, marker, slots)})
    query = _query(record, keys)
    response = _single(record, keys, RESPONSE, "answer", required=True)
    answer = record[response]
    if isinstance(answer, list | tuple):
        raise SampleError(
            response, f"a list of {len(answer)} answers; a sample trains on one answer: keep one per row"
        )
    user = split_markers(query, marker, slots) if query else []
    messages.append({"role": "user", "content": user})
    messages.append(
        {"role": "assistant", "content": split_markers(string_of(answer, response), marker, slots)}
    )
    image_keys = tuple(keys[k] for k in IMAGES if k in keys) or IMAGES
    _refuse_unread_images(record, set(keys.values()))
    column, column_key = column_images(record, image_keys)
    if not query and not column and not slots:
        raise SampleError(response, f"no question: expected one of {', '.join(QUERY)} (or images)")
    return Built(messages, slots, column, column_key, marker, response)


def mapped_columns(record: dict, names: dict[str, str | None], prompt: str | None) -> Built:
    """The columns named in data.columns: [system], user = the images then the question, the answer."""
    answer = string_of(_cell(record, names["answer"]), names["answer"])
    if not answer.strip():
        raise SampleError(names["answer"], "empty answer: there is nothing to learn from this sample")
    question = string_of(_cell(record, names["question"]), names["question"]) if names["question"] else prompt
    column, column_key = [], names["image"] or "image"
    if names["image"]:
        key = names["image"]
        if key == "image" and key not in record and "images" in record:
            key = "images"  # the default name, plural
        if key not in record:
            raise SampleError(
                names["image"],
                f"column missing (the sample has {sorted(map(str, record))[:8]}); set data.columns.image to "
                "the image column, or to null for a text-only set",
            )
        column, column_key = column_images(record, (key,))
    user = [image_part() for _ in column]
    if question:
        user.append(text_part(question))
    if not user:
        raise SampleError(names["question"] or "prompt", "the user turn would be empty: no image and no text")
    messages = []
    system = (
        string_of(record.get(names["system"]), names["system"], required=False) if names["system"] else ""
    )
    if system:
        messages.append({"role": "system", "content": [text_part(system)]})
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": [text_part(answer)]}]
    return Built(messages, [BARE] * len(column), column, column_key, None, names["answer"])


def _aliases(record: dict) -> dict[str, str]:
    """Lower-cased alias -> the record's own key, for the keys holding a value."""
    return {key.lower(): key for key, value in record.items() if key.lower() in KNOWN and value is not None}


def _single(
    record: dict, keys: dict[str, str], aliases: tuple[str, ...], what: str, *, required: bool
) -> str | None:
    present = [keys[a] for a in aliases if a in keys]
    if len(present) > 1:
        raise SampleError(
            present[0],
            f"{' and '.join(f'`{p}`' for p in present)} all name the {what}; keep one column "
            "(or read them as plain columns: data.format: columns with data.columns)",
        )
    if not present:
        if required:
            raise SampleError(what, f"missing: expected one of {', '.join(aliases)}")
        return None
    return present[0]


def _query(record: dict, keys: dict[str, str]) -> str:
    present = {a for a in QUERY if a in keys}
    if present == ALPACA:
        parts = [string_of(record[keys[a]], keys[a], required=False) for a in ("instruction", "input")]
        return "\n".join(part for part in parts if part)
    name = _single(record, keys, QUERY, "question", required=False)
    return string_of(record[name], name, required=False) if name else ""


def _pairs(value: Any, key: str) -> list[tuple[str, str]]:
    """[[question, answer], ...], also when written as text (JSON or a Python literal, as in CSV)."""
    if isinstance(value, str):
        value = _parse_list(value, key)
    if not isinstance(value, list | tuple):
        raise SampleError(key, f"expected a list of [question, answer] pairs, got {type(value).__name__}")
    pairs = []
    for i, pair in enumerate(value):
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise SampleError(f"{key}[{i}]", "expected a [question, answer] pair")
        pairs.append((string_of(pair[0], f"{key}[{i}][0]"), string_of(pair[1], f"{key}[{i}][1]")))
    return pairs


def _parse_list(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(text)  # ms-swift writes history as "[['q1', 'r1']]"
    except (ValueError, SyntaxError):
        raise SampleError(
            key, "not a list of [question, answer] pairs (neither JSON nor a Python literal)"
        ) from None


def _refuse_unread_images(record: dict, read: set[str]) -> None:
    """An image column under a name no alias covers would be dropped silently: name it instead."""
    for key, value in record.items():
        if key not in read and looks_like_images(value):
            raise SampleError(
                key,
                f"looks like images, but images are read from `images` or `image`; rename the column, or "
                f"map it: data.format: columns with data.columns.image: {key}",
            )


def text_cell(record: dict, column: str) -> str:
    """A required text column: a named problem when it is missing, null or not text."""
    return string_of(_cell(record, column), column)


def _cell(record: dict, column: str) -> Any:
    if column not in record:
        raise SampleError(
            column, f"column missing (the sample has {sorted(map(str, record))[:8]}); map it in data.columns"
        )
    if record[column] is None:
        raise SampleError(column, "empty (null)")
    return record[column]
