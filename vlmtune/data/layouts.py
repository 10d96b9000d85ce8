"""Normalising one record of any supported layout into a Sample (docs/data.md has an example of each).

Conversations (this module):
- messages: OpenAI/TRL/Axolotl ``messages`` whose content is a string or a list of parts; an image
  part names its source inline (``image``, ``path``, ``url``, ``base64``, OpenAI ``image_url``) or is
  bare and takes the next entry of the ``images`` column.
- sharegpt: ``conversations`` (or ``messages``/``conversation``) with ``from``/``value`` or
  ``role``/``content`` turns whose text marks each image with ``<image>``, plus ``images`` (or one
  ``image``): ShareGPT, LLaVA, LLaMA-Factory, ms-swift.
- prompt_completion: TRL's ``prompt`` (a list of turns) + ``completion``; loss on the completion only.
- exchanges: a list of ``{user, assistant}`` pairs: The Cauldron's ``texts`` (``source`` ignored),
  ms-swift's ``conversation`` of ``{human, assistant}``.
Flat records (vlmtune.data.flat): query_response (ms-swift query/response/history/system and their
aliases, LLaMA-Factory's alpaca instruction/input/output) and columns (mapped in data.columns).

Strings hold markers (``data.image_placeholder``) in every layout but ``messages``, whose strings
are plain text as in TRL. A record that references no image but has an image column gets its
images before the first user text (TRL, ms-swift, Axolotl); otherwise the references must match
the column one for one. A record that cannot be read raises a SampleError naming field and reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.data import flat
from vlmtune.data.images import ImageProblem, decode_base64, resolve_source
from vlmtune.data.parts import (
    Built,
    Found,
    column_images,
    fill_slots,
    put_images_first,
    require_assistant_text,
    split_markers,
    string_of,
    system_turn,
    turns_of,
)
from vlmtune.data.samples import Sample, SampleError
from vlmtune.data.sources import CONVERSATION_KEYS, RowImage

if TYPE_CHECKING:
    from vlmtune.recipe import DataSection

EXCHANGE_KEYS = ("texts", "conversation")  # lists of {user, assistant} pairs (The Cauldron, ms-swift)
EXCHANGE_USER = ("user", "human")
EXCHANGE_ASSISTANT = ("assistant", "gpt", "bot")
EXCHANGE_IGNORED = ("source",)  # The Cauldron's name of the dataset each exchange came from


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
    url_max_bytes: int = 64 << 20
    follow_symlinks: bool = False
    columns_mapped: bool = False  # data.columns or data.prompt set: plain columns are read as mapped
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
            url_max_bytes=data.url_max_bytes,
            follow_symlinks=data.follow_symlinks,
            columns_mapped=data.columns != data.DEFAULT_COLUMNS or data.prompt is not None,
        )

    def read(self, index: int, record: Any) -> Sample:
        if isinstance(record, SampleError):
            raise record
        if not isinstance(record, dict):
            raise SampleError("sample", f"expected an object (a JSON dict), got {type(record).__name__}")
        layout = self.detect(record)
        built = self.build(layout, record)
        if self.require_answer:
            require_assistant_text(built.messages, built.where)
        images, fields = self.images(index, built)
        return Sample(index, built.messages, images, fields, layout, built.trained_from)

    def images(self, index: int, built: Built) -> tuple[list, list[str]]:
        """The lazy sources of a built record's images, in order, and where each came from. A record
        that references no image but has an image column gets them before its first user text."""
        if not built.slots and built.column:
            put_images_first(built.messages, len(built.column), built.column_key, built.slots)
        found = fill_slots(built.slots, built.column, built.column_key, built.marker)
        return [self.source(index, f) for f in found], [f.field for f in found]

    def detect(self, record: dict) -> str:
        """The layout of a record from its keys (data.format when it is not auto)."""
        if self.format != "auto":
            return self.format
        key = conversation_key(record)
        if key is not None:
            turns = record[key]
            if is_exchange_list(turns):
                return "exchanges"
            if key != "messages" or (
                isinstance(turns, list)
                and any(isinstance(t, dict) and ("from" in t or "value" in t) for t in turns)
            ):
                return "sharegpt"
            # `messages` of plain strings with an image list: LLaMA-Factory's and ms-swift's style.
            strings = isinstance(turns, list) and all(
                isinstance(t, dict) and not isinstance(t.get("content"), list) for t in turns
            )
            return "sharegpt" if strings and column_images(record)[0] else "messages"
        if any(is_exchange_list(record.get(k)) for k in EXCHANGE_KEYS):
            return "exchanges"
        if isinstance(record.get("prompt"), list) and "completion" in record:
            return "prompt_completion"
        if self.columns_mapped and self.columns["answer"] in record:
            return "columns"
        if flat.has_response(record):
            return "query_response"
        raise SampleError(
            "sample",
            f"cannot tell its layout from its keys {sorted(map(str, record))[:8]}: expected `messages` or "
            "`conversations`, TRL's `prompt` + `completion`, The Cauldron's `texts`, or a question and an "
            "answer column (`query`/`response`, `instruction`/`output`, ...; map others with data.columns)",
        )

    # --- layouts -----------------------------------------------------------------------------

    def build(self, layout: str, record: dict) -> Built:
        """A record read in one layout: its messages and its image references, not yet resolved."""
        if layout in ("messages", "sharegpt"):
            return self._conversation(record, marker=self.placeholder if layout == "sharegpt" else None)
        if layout == "prompt_completion":
            return self._prompt_completion(record)
        if layout == "exchanges":
            return self._exchanges(record)
        if layout == "query_response":
            return flat.query_response(record, self.placeholder)
        if layout == "columns":
            return flat.mapped_columns(record, self.columns, self.prompt)
        raise SampleError("sample", f"unknown layout {layout!r}")  # pragma: no cover (the schema refuses it)

    def _conversation(self, record: dict, marker: str | None) -> Built:
        key = conversation_key(record)
        if key is None:
            raise SampleError("messages", "missing; a conversation needs `messages` (or `conversations`)")
        slots: list = []
        messages = system_turn(record, marker, slots)
        messages += turns_of(record[key], key, marker, slots)
        column, column_key = column_images(record)
        return Built(messages, slots, column, column_key, marker, key)

    def _prompt_completion(self, record: dict) -> Built:
        slots: list = []
        marker = self.placeholder
        messages = turns_of(record.get("prompt"), "prompt", marker, slots)
        completion = record.get("completion")
        if isinstance(completion, str):  # a conversational prompt with a plain-text completion
            completion = [{"role": "assistant", "content": completion}]
        answers = turns_of(completion, "completion", marker, slots)
        if any(m["role"] != "assistant" for m in answers):
            raise SampleError("completion", "expected assistant turns only; the prompt holds the rest")
        column, column_key = column_images(record)
        return Built(messages + answers, slots, column, column_key, marker, "completion", len(messages))

    def _exchanges(self, record: dict) -> Built:
        key = next((k for k in (*CONVERSATION_KEYS, *EXCHANGE_KEYS) if is_exchange_list(record.get(k))), None)
        if key is None:
            raise SampleError(
                "texts", "missing; expected a list of {user, assistant} pairs (`texts` or `conversation`)"
            )
        marker = self.placeholder
        slots: list = []
        messages = system_turn(record, marker, slots)
        for i, pair in enumerate(record[key]):
            where = f"{key}[{i}]"
            unknown = sorted(set(pair) - {*EXCHANGE_USER, *EXCHANGE_ASSISTANT, *EXCHANGE_IGNORED})
            if unknown:
                raise SampleError(
                    where, f"unexpected key(s) {unknown}: an exchange holds a user and an assistant text"
                )
            for role, names in (("user", EXCHANGE_USER), ("assistant", EXCHANGE_ASSISTANT)):
                name = _one_key(pair, names, where)
                text = string_of(pair[name], f"{where}.{name}")
                messages.append({"role": role, "content": split_markers(text, marker, slots)})
        column, column_key = column_images(record)
        return Built(messages, slots, column, column_key, marker, key)

    # --- images --------------------------------------------------------------------------------

    def source(self, index: int, found: Found) -> Any:
        """The lazy source of one image: a RowImage when its data stays in an Arrow table."""
        if self.table is not None and _stays_in_table(found):
            return RowImage(self.table, index, found.path, found.encoding)
        try:
            if found.encoding == "base64":
                return decode_base64(found.value)
            return resolve_source(
                found.value, self.root, allow_urls=self.allow_urls, url_timeout=self.url_timeout,
                url_max_bytes=self.url_max_bytes, follow_symlinks=self.follow_symlinks,
            )  # fmt: skip
        except ImageProblem as exc:
            raise SampleError(found.field, exc.reason) from None


def conversation_key(record: dict) -> str | None:
    return next((key for key in CONVERSATION_KEYS if key in record), None)


def is_exchange_list(value: Any) -> bool:
    """A list of {user, assistant} pairs (and not role/content turns)."""
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(pair, dict) for pair in value)
        and any(key in value[0] for key in EXCHANGE_USER)
        and not any(key in value[0] for key in ("role", "from", "content", "value"))
    )


def _one_key(pair: dict, names: tuple[str, ...], where: str) -> str:
    present = [name for name in names if name in pair]
    if len(present) != 1:
        got = "none" if not present else " and ".join(f"`{p}`" for p in present)
        raise SampleError(where, f"expected exactly one of {', '.join(f'`{n}`' for n in names)}, got {got}")
    return present[0]


def _stays_in_table(found: Found) -> bool:
    """Image data kept inside the dataset (read again when opened) rather than copied into the sample."""
    value = found.value
    if isinstance(value, bytes) or (isinstance(value, dict) and bool(value.get("bytes"))):
        return True
    return isinstance(value, str) and (found.encoding == "base64" or value[:5].lower() == "data:")
