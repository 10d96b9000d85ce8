"""The pieces every layout reader is built from: turns, content parts, image markers, image columns.

A reader turns a record into ``messages`` (content always a list of text and ``{"type": "image"}``
parts) plus ``slots``: one entry per image part, in the order the parts appear. A slot is either
a ``Found`` (the part names its own source: a path, URL, data URI, base64 string or embedded
bytes) or ``BARE`` (the part takes the next entry of the record's image column). ``fill_slots``
pairs the bare slots with the column; when a record references no image at all but has an image
column, ``put_images_first`` puts every image before the first user text, as TRL, ms-swift and
Axolotl do for rows written without markers.

Everything here raises SampleError naming the field and the reason; nothing is dropped silently.
Preference-pair layouts (DPO) read their prompt and answers with these same functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, NamedTuple

from vlmtune.data.samples import SampleError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
IMAGE_KEYS = ("images", "image")  # the record-level image column, in order of preference
# Keys of an image part that name its source (Axolotl: image, path, url, base64; TRL/Qwen: image).
INLINE_KEYS = ("image", "path", "url", "base64")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class Found(NamedTuple):
    """A value of the record, where it sits (for messages) and how to reach it again (for RowImage)."""

    value: Any
    field: str  # e.g. messages[0].content[1].image
    path: tuple  # keys and list positions from the record to the value
    encoding: str | None = None  # "base64": the value is a bare base64 string (Axolotl's `base64` key)


BARE = None  # a slot whose image comes from the record's image column


@dataclass
class Built:
    """A record read into messages, before its images are resolved."""

    messages: list[dict]
    slots: list  # one per image part, in order: a Found (inline source) or BARE
    column: list[Found]  # the record's image column
    column_key: str
    marker: str | None  # the image marker the strings were split at (None: strings are plain text)
    where: str  # the field named when the record has nothing to learn from
    trained_from: int = 0  # messages before it are the prompt (see Sample.trained_from)


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def image_part() -> dict:
    return {"type": "image"}


def role_of(value: Any, field: str) -> str:
    if value is None:
        raise SampleError(field, "missing; each turn needs a `role` (or `from`)")
    role = ROLE_ALIASES.get(value) if isinstance(value, str) else None
    if role is None:
        raise SampleError(field, f"unknown role {value!r}; expected one of {', '.join(ROLE_ALIASES)}")
    return role


def string_of(value: Any, field: str, *, required: bool = True) -> str:
    """A text cell: a string (numbers are written as text); None is '' unless required."""
    if value is None:
        if required:
            raise SampleError(field, "missing (null); expected text")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SampleError(field, f"expected text, got {type(value).__name__}")
    return str(value)


def split_markers(text: str, marker: str | None, slots: list) -> list[dict]:
    """Text parts, with one bare image part for each ``marker`` (None: the text is kept whole)."""
    if marker is None:
        return [text_part(text)]
    parts = []
    for k, piece in enumerate(text.split(marker)):
        if k:
            slots.append(BARE)
            parts.append(image_part())
        if piece:
            parts.append(text_part(piece))
    return parts


def content_parts(content: Any, at: Found, marker: str | None, slots: list) -> list[dict]:
    """A turn's content (a string, or a list of text/image/image_url parts) as a list of parts.

    ``at`` is where the content sits (its value is unused); ``marker`` splits strings at image
    markers (None: strings are plain text). Parts in a list are never split: a part list says
    where its images go itself.
    """
    if content is None:
        raise SampleError(at.field, "missing; expected a string or a list of parts")
    if isinstance(content, str):
        return split_markers(content, marker, slots)
    if not isinstance(content, list):
        raise SampleError(at.field, f"expected a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, part in enumerate(content):
        where = f"{at.field}[{i}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(text_part(string_of(part.get("text"), f"{where}.text")))
        elif kind in ("image", "image_url"):
            inline = inline_image(part, Found(part, where, (*at.path, i)))
            slots.append(BARE if inline is None else inline)
            parts.append(image_part())
        else:
            got = f"type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
            raise SampleError(where, f"expected a text, image or image_url part, got {got}")
    return parts


def inline_image(part: dict, at: Found) -> Found | None:
    """Where an image part names its own source; None for a bare ``{"type": "image"}``.

    ``{"type": "image_url", "image_url": {"url": ...}}`` (OpenAI; a data URI or a URL), or
    ``{"type": "image", KEY: ...}`` with KEY one of image, path, url, base64 (Axolotl, TRL).
    Parts stored by `datasets` carry every key, the unused ones null: null means absent.
    """
    if part.get("type") == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            found = Found(url.get("url"), f"{at.field}.image_url.url", (*at.path, "image_url", "url"))
        else:
            found = Found(url, f"{at.field}.image_url", (*at.path, "image_url"))
        if found.value is None:
            raise SampleError(found.field, "image_url part without a url")
        return found
    named = [key for key in INLINE_KEYS if part.get(key) is not None]
    if len(named) > 1:
        raise SampleError(
            at.field, f"an image part naming its image twice ({', '.join(named)}); keep one of them"
        )
    if not named:
        return None
    key = named[0]
    return Found(part[key], f"{at.field}.{key}", (*at.path, key), "base64" if key == "base64" else None)


def column_images(record: dict, keys: tuple[str, ...] = IMAGE_KEYS) -> tuple[list[Found], str]:
    """The images of the record's image column (the first of ``keys`` present) and its name."""
    present = [key for key in keys if key in record and not _empty(record[key])]
    if len(present) > 1:
        raise SampleError(
            present[0], f"both `{present[0]}` and `{present[1]}` hold images; keep one image column"
        )
    key = present[0] if present else next((k for k in keys if k in record), keys[0])
    return column_entries(record.get(key), key), key


def column_entries(value: Any, key: str) -> list[Found]:
    """One image or a list of them (a CSV cell may hold the list as JSON text)."""
    value = _json_list(value)
    if _empty(value):
        return []
    if isinstance(value, list | tuple):
        return [Found(item, f"{key}[{i}]", (key, i)) for i, item in enumerate(value)]
    if isinstance(value, str | bytes | dict) or hasattr(value, "mode"):  # one source (a PIL image has .mode)
        return [Found(value, key, (key,))]
    raise SampleError(key, f"expected an image or a list of images, got {type(value).__name__}")


def system_turn(record: dict, marker: str | None, slots: list) -> list[dict]:
    """A record-level `system` string (LLaMA-Factory, ms-swift) as the first turn; [] when there is none."""
    system = record.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise SampleError("system", f"expected a string, got {type(system).__name__}")
    return [{"role": "system", "content": split_markers(system, marker, slots)}]


def turns_of(turns: Any, key: str, marker: str | None, slots: list) -> list[dict]:
    """A list of role/content (or from/value) turns under ``key`` as messages of parts."""
    if not isinstance(turns, list) or not turns:
        got = "empty" if isinstance(turns, list) else f"a {type(turns).__name__}"
        raise SampleError(key, f"expected a non-empty list of turns, got {got}")
    messages = []
    for t, turn in enumerate(turns):
        where = f"{key}[{t}]"
        if not isinstance(turn, dict):
            raise SampleError(where, f"expected an object with role and content, got {type(turn).__name__}")
        role_key = "from" if "from" in turn and "role" not in turn else "role"
        content_key = "value" if "value" in turn and "content" not in turn else "content"
        role = role_of(turn.get(role_key), f"{where}.{role_key}")
        at = Found(None, f"{where}.{content_key}", (key, t, content_key))
        messages.append({"role": role, "content": content_parts(turn.get(content_key), at, marker, slots)})
    return messages


def put_images_first(messages: list[dict], count: int, key: str, slots: list) -> None:
    """``count`` bare image parts before the first user text: a record written without markers."""
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if first_user is None:
        raise SampleError(key, f"{count} image(s) but no user turn to put them in")
    first_user["content"][:0] = [image_part() for _ in range(count)]
    slots[:0] = [BARE] * count


def fill_slots(slots: list, column: list[Found], key: str, marker: str | None) -> list[Found]:
    """Every image in the order its part appears: inline sources in place, bare ones from the column."""
    bare = sum(slot is BARE for slot in slots)
    if bare != len(column):
        if marker is not None:
            counted = f"{bare} `{marker}` placeholder(s) in the text"
            fix = (
                f"write one {marker} in the text where each image goes (or none: every image then goes first)"
            )
        else:
            counted = f"{bare} image part(s) without an inline source"
            fix = 'give each image one bare {"type": "image"} part where it goes'
        raise SampleError(key, f"{counted} but {len(column)} image(s) in `{key}`; {fix}")
    pending = iter(column)
    return [next(pending) if slot is BARE else slot for slot in slots]


def looks_like_images(value: Any) -> bool:
    """A column of image paths or `datasets` Image values (to refuse silently ignoring one)."""
    if isinstance(value, list | tuple):
        return bool(value) and all(looks_like_images(item) for item in value)
    if isinstance(value, dict):
        return set(value) == {"bytes", "path"}
    return isinstance(value, str) and value.lower().endswith(IMAGE_SUFFIXES) and "\n" not in value


def require_assistant_text(messages: list[dict], where: str) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise SampleError(where, "no assistant turn: there is nothing to learn from this sample")
    if not any(p.get("text", "").strip() for m in answers for p in m["content"] if p["type"] == "text"):
        raise SampleError(where, "every assistant turn is empty: there is nothing to learn from this sample")


def _empty(value: Any) -> bool:
    return value is None or (isinstance(value, str | list | tuple) and len(value) == 0)


def _json_list(value: Any) -> Any:
    """A list written as JSON text (how CSV files hold one); anything else as it is."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
