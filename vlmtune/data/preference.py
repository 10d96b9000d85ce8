"""Preference pairs: one prompt (with its images) and two answers, chosen and rejected.

The layouts users have, detected per record from its keys (docs/preference.md has examples):

- trl: TRL's ``prompt`` / ``chosen`` / ``rejected`` (+ ``images``). The prompt is a list of turns
  (string contents or part lists) or one string; each answer a list of one assistant turn or a
  string. String contents without a ``<image>`` marker get the images before the text of the first
  user turn, as TRL puts them. Without ``prompt``, ``chosen`` and ``rejected`` are whole
  conversations and the prompt is the turns they share (TRL's implicit prompt).
- columns: RLAIF-V style plain columns: the image and question columns of ``data.columns`` (or
  ``data.prompt``), and ``chosen`` / ``rejected`` strings.
- sharegpt: LLaMA-Factory's ranking sets: ``conversations`` (or ``messages``) up to the last user
  turn, ``chosen`` / ``rejected`` turns (``from``/``value`` or ``role``/``content``), ``images``,
  ``<image>`` markers in the text.
- swift: ms-swift's ``messages`` whose last assistant turn is the chosen answer, plus
  ``rejected_response``; ``<image>`` markers in the text, ``images``.

The prompt is read by the SFT readers (vlmtune.data.layouts: SampleReader's conversation and
columns readers and its image filling, called here on the prompt part of a record), so images,
parts, markers and roles follow the same rules and report problems the same way; a pair with an
empty or a duplicated answer is refused with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vlmtune.data.flat import text_cell
from vlmtune.data.layouts import SampleReader, conversation_key
from vlmtune.data.parts import ROLE_ALIASES, role_of
from vlmtune.data.samples import Sample, SampleError
from vlmtune.data.sources import RowImage

ANSWER_KEYS = ("chosen", "rejected")
SWIFT_REJECTED = "rejected_response"


@dataclass
class PreferencePair:
    """A prompt conversation and two answers to its last user turn, images still lazy."""

    index: int  # position in the source, for messages users can act on
    prompt: list[dict]  # normalised turns (content = list of parts), ending with a user turn
    chosen: dict  # {"role": "assistant", "content": [text parts]}
    rejected: dict
    images: list[Any] = field(default_factory=list)  # the prompt's images, in order
    image_fields: list[str] = field(default_factory=list)
    format: str = "trl"  # the layout it was read as: trl, columns, sharegpt or swift

    @property
    def n_images(self) -> int:
        return len(self.images)

    def image_field(self, i: int) -> str:
        return self.image_fields[i] if i < len(self.image_fields) else f"images[{i}]"

    def side(self, answer: str) -> Sample:
        """The prompt followed by the ``chosen`` or the ``rejected`` answer, as one SFT sample."""
        turn = self.chosen if answer == "chosen" else self.rejected
        return Sample(self.index, [*self.prompt, turn], self.images, self.image_fields, self.format)

    def answer_text(self, answer: str) -> str:
        turn = self.chosen if answer == "chosen" else self.rejected
        return "".join(part["text"] for part in turn["content"])


def looks_like_pair(record: Any) -> bool:
    """Does a record hold a preference pair (of any layout) rather than an SFT sample?"""
    return isinstance(record, dict) and (
        SWIFT_REJECTED in record or all(key in record for key in ANSWER_KEYS)
    )


@dataclass(frozen=True)
class PairReader:
    """Turns one record of any preference layout into a PreferencePair (or a SampleError)."""

    samples: SampleReader  # the SFT reader: prompt turns, images, columns, markers

    @classmethod
    def from_section(cls, data: Any, default_root: Path, table: Any = None) -> PairReader:
        return cls(SampleReader.from_section(data, default_root, table))

    def read(self, index: int, record: Any) -> PreferencePair:
        if isinstance(record, SampleError):
            raise record
        if not isinstance(record, dict):
            raise SampleError("sample", f"expected an object (a JSON dict), got {type(record).__name__}")
        layout = self.detect(record)
        if layout == "columns":
            pair = self._from_columns(index, record)
        else:
            prompt_key, turns, chosen, rejected = _split_conversation(record, layout)
            prompt, images, fields = self._prompt(index, record, prompt_key, turns, layout)
            pair = PreferencePair(index, prompt, chosen, rejected, images, fields, layout)
        check_pair(pair)
        return pair

    def detect(self, record: dict) -> str:
        if self.samples.format == "columns":
            return "columns"
        if SWIFT_REJECTED in record:
            return "swift"
        if all(key in record for key in ANSWER_KEYS):
            if "prompt" in record or isinstance(record["chosen"], list):
                return "trl"
            if conversation_key(record):
                return "sharegpt"
            return "columns"
        raise SampleError(
            "sample",
            f"cannot tell its preference layout from its keys {sorted(map(str, record))[:8]}: expected "
            "prompt/chosen/rejected (TRL), image/question/chosen/rejected columns (RLAIF-V), conversations + "
            "chosen/rejected (LLaMA-Factory) or messages + rejected_response (ms-swift)",
        )

    # --- layouts -----------------------------------------------------------------------------

    def _from_columns(self, index: int, record: dict) -> PreferencePair:
        # The SFT columns reader with `chosen` as its answer column builds the prompt and its images.
        reader = replace(self.samples, columns={**self.samples.columns, "answer": "chosen"})
        built = reader.build("columns", record)
        images, fields = reader.images(index, built)
        messages = built.messages
        rejected = text_cell(record, "rejected")
        return PreferencePair(
            index, messages[:-1], messages[-1], _answer_turn(rejected, "rejected"), images, fields, "columns"
        )

    def _prompt(
        self, index: int, record: dict, key: str, turns: list, layout: str
    ) -> tuple[list[dict], list, list[str]]:
        """The prompt turns normalised, with their images, by the SFT conversation reader."""
        split = self._splits_markers(turns, layout)
        if layout == "trl" and not split:
            turns = _images_before_first_user_text(turns, len(_column(record)))
        conversation = {
            "messages": turns,
            **{k: record[k] for k in ("images", "image", "system") if k in record},
        }
        style = "sharegpt" if split else "messages"
        try:
            built = self.samples.build(style, conversation)
            images, fields = self.samples.images(index, built)
            messages = built.messages
        except SampleError as exc:
            raise _renamed(exc, "messages", key) from None
        if messages[-1]["role"] != "user":
            raise SampleError(key, "the prompt must end with a user turn: the two answers reply to it")
        return (
            messages,
            [_renamed_image(image, key) for image in images],
            [_renamed_field(f, key) for f in fields],
        )

    def _splits_markers(self, turns: list, layout: str) -> bool:
        """Are `<image>` markers in string contents image positions? (data.format can force it)"""
        if self.samples.format in ("messages", "sharegpt"):
            return self.samples.format == "sharegpt"
        if layout in ("sharegpt", "swift"):
            return True
        marker = self.samples.placeholder
        return any(isinstance(text, str) and marker in text for text in map(_string_content, turns))


# --- pieces of a record ----------------------------------------------------------------------------


def _string_content(turn: Any) -> str | None:
    """A turn's content when it is one string (role/content or from/value); None otherwise."""
    if not isinstance(turn, dict):
        return None
    content = turn.get("content", turn.get("value"))
    return content if isinstance(content, str) else None


def _column(record: dict) -> list:
    value = record.get("images", record.get("image"))
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, list | tuple) else [value]


def _split_conversation(record: dict, layout: str) -> tuple[str, list, dict, dict]:
    """(record key of the prompt, prompt turns, chosen turn, rejected turn) of a conversation layout."""
    if layout == "swift":
        turns = _turn_list(record.get("messages"), "messages")
        last = turns[-1]
        if not isinstance(last, dict) or _turn_role(last, f"messages[{len(turns) - 1}]") != "assistant":
            raise SampleError(
                "messages", "the last turn must be the chosen assistant answer (ms-swift layout)"
            )
        return (
            "messages",
            turns[:-1],
            _answer_turn(last, "messages[-1]"),
            _answer_turn(record[SWIFT_REJECTED], SWIFT_REJECTED),
        )
    if layout == "sharegpt":
        key = conversation_key(record)
        return key, _turn_list(record[key], key), *(_answer_turn(record[k], k) for k in ANSWER_KEYS)
    if "prompt" in record:  # trl, explicit prompt
        prompt = record["prompt"]
        turns = (
            [{"role": "user", "content": prompt}] if isinstance(prompt, str) else _turn_list(prompt, "prompt")
        )
        return "prompt", turns, *(_answer_turn(record[k], k) for k in ANSWER_KEYS)
    return _implicit_prompt(record)


def _implicit_prompt(record: dict) -> tuple[str, list, dict, dict]:
    """TRL's implicit prompt: two whole conversations that differ only in their last turn."""
    chosen, rejected = (_turn_list(record[k], k) for k in ANSWER_KEYS)
    if chosen[:-1] != rejected[:-1]:
        raise SampleError(
            "rejected",
            "without a `prompt`, chosen and rejected must be the same conversation up to their answers",
        )
    return (
        "chosen",
        chosen[:-1],
        _answer_turn(chosen[-1], "chosen[-1]"),
        _answer_turn(rejected[-1], "rejected[-1]"),
    )


def _turn_list(value: Any, where: str) -> list:
    if not isinstance(value, list) or not value:
        got = "empty" if isinstance(value, list) else f"a {type(value).__name__}"
        raise SampleError(where, f"expected a non-empty list of turns, got {got}")
    return value


def _turn_role(turn: dict, where: str) -> str:
    key = "from" if "from" in turn and "role" not in turn else "role"
    return role_of(turn.get(key), f"{where}.{key}")


def _answer_turn(value: Any, where: str) -> dict:
    """One answer as an assistant turn of text parts: a string, a turn, or a list holding one turn."""
    if isinstance(value, list):
        if len(value) != 1:
            raise SampleError(where, f"expected one assistant turn, got {len(value)} turns")
        value, where = value[0], f"{where}[0]"
    if isinstance(value, dict):
        if _turn_role(value, where) != "assistant":
            raise SampleError(where, "an answer must be an assistant turn")
        content_key = "value" if "value" in value and "content" not in value else "content"
        value, where = value.get(content_key), f"{where}.{content_key}"
    return {"role": "assistant", "content": [{"type": "text", "text": _answer_text(value, where)}]}


def _answer_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise SampleError(
                    f"{where}[{i}]", "an answer holds text parts only (images belong in the prompt)"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise SampleError(where, f"expected the answer's text, got {type(content).__name__}")


def _images_before_first_user_text(turns: list, n_images: int) -> list:
    """TRL's rule for string contents: all images go before the text of the first user turn."""
    if not n_images or any(_string_content(turn) is None for turn in turns):
        return turns
    out, placed = [], False
    for turn in turns:
        if not placed and ROLE_ALIASES.get(turn.get("role")) == "user":
            turn = {
                **turn,
                "content": [{"type": "image"}] * n_images + [{"type": "text", "text": turn["content"]}],
            }
            placed = True
        out.append(turn)
    return out


def _renamed(exc: SampleError, old: str, new: str) -> SampleError:
    """A prompt problem named after the record's own key (the SFT reader calls every conversation messages)."""
    return SampleError(_renamed_field(exc.field, new, old), exc.reason) if new != old else exc


def _renamed_field(where: str, key: str, old: str = "messages") -> str:
    return key + where[len(old) :] if where.startswith(old) and key != old else where


def _renamed_image(image: Any, key: str) -> Any:
    """An embedded image's path into its row, under the record's own prompt key."""
    if isinstance(image, RowImage) and image.path and image.path[0] == "messages" and key != "messages":
        return replace(image, path=(key, *image.path[1:]))
    return image


def check_pair(pair: PreferencePair) -> None:
    """Both answers present and different: a pair that cannot teach a preference is refused."""
    chosen, rejected = pair.answer_text("chosen"), pair.answer_text("rejected")
    for name, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise SampleError(name, f"empty {name} answer: the pair has nothing to compare")
    if chosen.strip() == rejected.strip():
        raise SampleError(
            "rejected", "the chosen and rejected answers are identical: the pair teaches nothing"
        )
