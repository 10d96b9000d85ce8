"""Normalising one record of any supported layout into a Sample (docs/data.md has examples).

- messages: OpenAI/TRL ``messages`` whose content is a string or a list of parts; an image part
  names its source inline (``{"type": "image", "image": ...}``, ``{"type": "image_url", ...}``)
  or is bare and takes the next entry of the ``images`` column.
- sharegpt: ``conversations`` (or ``messages``) with ``from``/``value`` or ``role``/``content``
  turns whose text marks each image with ``<image>``, plus an ``images`` list (or one ``image``).
- columns: plain columns (image, question, answer, system) named in ``data.columns``.

A record that cannot be normalised raises a SampleError naming the field and the reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data.samples import Sample, SampleError
from vlmtune.data.sources import CONVERSATION_KEYS, RowImage
from vlmtune.images import ImageProblem, resolve_source

if TYPE_CHECKING:
    from vlmtune.recipe import DataSection

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
IMAGE_KEYS = ("images", "image")


@dataclass(frozen=True)
class SampleReader:
    """Turns one record of any supported layout into a Sample (or a SampleError naming the field)."""

    root: Path
    format: str
    columns: dict[str, str | None]
    prompt: str | None
    placeholder: str
    allow_urls: bool
    url_timeout: float
    table: Any = None  # rows' source when Arrow-backed: embedded images become RowImage references
    require_answer: bool = True  # GRPO's prompts may end at a user turn (vlmtune.stages.grpo.PromptReader)

    @classmethod
    def from_section(cls, data: DataSection, default_root: Path, table: Any = None) -> SampleReader:
        return cls(
            table=table,
            root=Path(data.image_root) if data.image_root else default_root,
            format=data.format,
            columns=dict(data.columns),
            prompt=data.prompt,
            placeholder=data.image_placeholder,
            allow_urls=data.allow_urls,
            url_timeout=data.url_timeout,
        )

    def read(self, index: int, record: Any) -> Sample:
        if isinstance(record, SampleError):
            raise record
        if not isinstance(record, dict):
            raise SampleError("sample", f"expected an object (a JSON dict), got {type(record).__name__}")
        layout = self.detect(record)
        if layout == "columns":
            messages, slots, column_images, images_key = self._from_columns(record)
        else:
            messages, slots, column_images, images_key = self._from_conversation(record, layout)
        if self.require_answer:
            _require_assistant_text(messages, _conversation_key(record) or "messages")
        images, fields = self._fill_images(index, slots, column_images, images_key, layout)
        return Sample(index, messages, images, fields, layout)

    def detect(self, record: dict) -> str:
        if self.format != "auto":
            return self.format
        key = _conversation_key(record)
        if key is None:
            if self.columns["answer"] in record:
                return "columns"
            raise SampleError(
                "sample",
                f"cannot tell its layout from its keys {sorted(map(str, record))[:8]}: expected `messages`, "
                f"`conversations`, or the `{self.columns['answer']}` column (map columns with data.columns)",
            )
        turns = record[key]
        if key == "conversations" or (
            isinstance(turns, list)
            and any(isinstance(t, dict) and ("from" in t or "value" in t) for t in turns)
        ):
            return "sharegpt"
        # `messages` with plain-string contents and an image list: LLaMA-Factory's sharegpt style.
        string_contents = isinstance(turns, list) and all(
            isinstance(t, dict) and not isinstance(t.get("content"), list) for t in turns
        )
        return "sharegpt" if string_contents and _column_images(record)[0] else "messages"

    # --- layouts -----------------------------------------------------------------------------

    def _from_conversation(self, record: dict, layout: str):
        key = _conversation_key(record)
        if key is None:
            raise SampleError("messages", f"missing; a {layout} sample needs `messages` (or `conversations`)")
        turns = record[key]
        if not isinstance(turns, list) or not turns:
            got = "empty" if isinstance(turns, list) else f"a {type(turns).__name__}"
            raise SampleError(key, f"expected a non-empty list of turns, got {got}")
        messages: list[dict] = []
        slots: list[tuple[str, Any]] = []
        system = record.get("system")
        if system is not None:
            if not isinstance(system, str):
                raise SampleError("system", f"expected a string, got {type(system).__name__}")
            if system:
                messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        for t, turn in enumerate(turns):
            where = f"{key}[{t}]"
            if not isinstance(turn, dict):
                raise SampleError(
                    where, f"expected an object with role and content, got {type(turn).__name__}"
                )
            role_key = "from" if "from" in turn and "role" not in turn else "role"
            content_key = "value" if "value" in turn and "content" not in turn else "content"
            role = _role(turn.get(role_key), f"{where}.{role_key}")
            at = (f"{where}.{content_key}", (key, t, content_key))
            parts = self._parts(turn.get(content_key), at, layout == "sharegpt", slots)
            messages.append({"role": role, "content": parts})
        column, images_key = _column_images(record)
        return messages, slots, column, images_key

    def _from_columns(self, record: dict):
        names = self.columns
        answer = _text_cell(record, names["answer"], required=True)
        if not answer.strip():
            raise SampleError(names["answer"], "empty answer: there is nothing to learn from this sample")
        question = _text_cell(record, names["question"], required=True) if names["question"] else self.prompt
        images: list[Any] = []
        if names["image"]:
            if names["image"] not in record:
                raise SampleError(
                    names["image"],
                    f"column missing (the sample has {sorted(map(str, record))[:8]}); set data.columns.image to "
                    "the image column, or to null for a text-only set",
                )
            images = _entries(_json_list_cell(record[names["image"]]), names["image"])
        user = [{"type": "image"} for _ in images]
        if question:
            user.append({"type": "text", "text": question})
        if not user:
            raise SampleError(
                names["question"] or "prompt", "the user turn would be empty: no image and no text"
            )
        messages = []
        system = _text_cell(record, names["system"], required=False) if names["system"] else None
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages += [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]
        slots = [("bare", None)] * len(images)
        return messages, slots, images, names["image"]

    # --- parts and images ----------------------------------------------------------------------

    def _parts(self, content: Any, at: tuple[str, tuple], split: bool, slots: list) -> list[dict]:
        where, path = at
        if content is None:
            raise SampleError(where, "missing; expected a string or a list of parts")
        if isinstance(content, str):
            return self._split_text(content, where, slots) if split else [{"type": "text", "text": content}]
        if not isinstance(content, list):
            raise SampleError(where, f"expected a string or a list of parts, got {type(content).__name__}")
        parts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise SampleError(
                        f"{where}[{i}].text", f"expected a string, got {type(part.get('text')).__name__}"
                    )
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                inline = _inline_source(part, f"{where}[{i}]", (*path, i))
                slots.append(("bare", None) if inline is None else ("inline", inline))
                parts.append({"type": "image"})
            else:
                got = f"type {kind!r}" if isinstance(part, dict) else f"a {type(part).__name__}"
                raise SampleError(f"{where}[{i}]", f"expected a text, image or image_url part, got {got}")
        return parts

    def _split_text(self, text: str, where: str, slots: list) -> list[dict]:
        parts = []
        for k, piece in enumerate(text.split(self.placeholder)):
            if k:
                slots.append(("bare", None))
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        return parts

    def _fill_images(
        self, index: int, slots: list, column: list, images_key: str, layout: str
    ) -> tuple[list, list[str]]:
        """Sources in the order their parts appear: inline ones in place, bare ones from the column."""
        bare = sum(kind == "bare" for kind, _ in slots)
        if bare != len(column):
            if layout == "sharegpt":
                counted = f"{bare} `{self.placeholder}` placeholder(s) in the text"
                fix = f"write one {self.placeholder} in the text where each image goes"
            else:
                counted = f"{bare} image part(s) without an inline source"
                fix = 'give each image one bare {"type": "image"} part where it goes'
            raise SampleError(images_key, f"{counted} but {len(column)} image(s) in `{images_key}`; {fix}")
        pending = iter(column)
        sources, fields = [], []
        for kind, payload in slots:
            value, where, path = payload if kind == "inline" else next(pending)
            if self.table is not None and _embedded(value):
                sources.append(RowImage(self.table, index, path))
            else:
                try:
                    sources.append(
                        resolve_source(
                            value, self.root, allow_urls=self.allow_urls, url_timeout=self.url_timeout
                        )
                    )
                except ImageProblem as exc:
                    raise SampleError(where, exc.reason) from None
            fields.append(where)
        return sources, fields


def _conversation_key(record: dict) -> str | None:
    return next((key for key in CONVERSATION_KEYS if key in record), None)


def _column_images(record: dict) -> tuple[list, str]:
    key = next((k for k in IMAGE_KEYS if k in record), "images")
    return _entries(record.get(key), key), key


def _entries(value: Any, key: str) -> list[tuple[Any, str, tuple]]:
    """The images of a column as (value, field, path in the record): one image or a list of them."""
    if value is None or value == "":
        return []
    if isinstance(value, list | tuple):
        return [(item, f"{key}[{i}]", (key, i)) for i, item in enumerate(value)]
    if isinstance(value, str | bytes | dict) or hasattr(value, "mode"):  # one source (a PIL image has .mode)
        return [(value, key, (key,))]
    raise SampleError(key, f"expected an image or a list of images, got {type(value).__name__}")


def _embedded(value: Any) -> bool:
    return isinstance(value, bytes) or (isinstance(value, dict) and bool(value.get("bytes")))


def _json_list_cell(value: Any) -> Any:
    """A list of images written as JSON text (how CSV files hold them); anything else as it is."""
    if isinstance(value, str) and value.startswith("[") and value.endswith("]"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _inline_source(part: dict, where: str, path: tuple) -> tuple[Any, str, tuple] | None:
    """(source, its field, its path in the record) of an image part that names its image; None if bare."""
    if part.get("type") == "image_url":
        url = part.get("image_url")
        if isinstance(url, dict):
            url, where, path = url.get("url"), f"{where}.image_url.url", (*path, "image_url", "url")
        else:
            where, path = f"{where}.image_url", (*path, "image_url")
        if url is None:
            raise SampleError(where, "image_url part without a url")
        return url, where, path
    key = next((k for k in ("image", "path", "url") if part.get(k) is not None), None)
    return None if key is None else (part[key], f"{where}.{key}", (*path, key))


def _role(value: Any, where: str) -> str:
    if value is None:
        raise SampleError(where, "missing; each turn needs a `role` (or `from`)")
    role = ROLE_ALIASES.get(value) if isinstance(value, str) else None
    if role is None:
        raise SampleError(where, f"unknown role {value!r}; expected one of {', '.join(ROLE_ALIASES)}")
    return role


def _text_cell(record: dict, column: str, *, required: bool) -> str:
    if column not in record:
        if not required:
            return ""
        raise SampleError(
            column, f"column missing (the sample has {sorted(map(str, record))[:8]}); map it in data.columns"
        )
    value = record[column]
    if value is None:
        if required:
            raise SampleError(column, "empty (null)")
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise SampleError(column, f"expected text, got {type(value).__name__}")
    return str(value)


def _require_assistant_text(messages: list[dict], where: str) -> None:
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers:
        raise SampleError(where, "no assistant turn: there is nothing to learn from this sample")
    if not any(p.get("text", "").strip() for m in answers for p in m["content"] if p["type"] == "text"):
        raise SampleError(where, "every assistant turn is empty: there is nothing to learn from this sample")
