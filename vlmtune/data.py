"""Read samples into one shape: OpenAI-style messages plus the images they show, in order.

A ``Sample`` holds ``messages`` whose content is always a list of ``{"type": "text", "text": ...}``
and ``{"type": "image"}`` parts, and ``images``: one source per image part (a path, bytes, or a
PIL image), opened only when the collator needs the pixels. Problems are collected per sample
with its index, the field and the reason; nothing is dropped without being counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmtune.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Sample:
    index: int  # position in the source file, for messages users can act on
    messages: list[dict]
    images: list[Any] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class Problem:
    index: int
    field: str
    reason: str

    def __str__(self) -> str:
        return f"sample {self.index}: {self.field}: {self.reason}"


class SampleError(ValueError):
    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


# --- reading files ----------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict]:
    """Rows of a .jsonl or .json file as dicts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}", hint="paths in a recipe are relative to the recipe's folder")
    if path.suffix == ".jsonl":
        return _read_jsonl(path)
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{path} is not valid JSON: {exc}", hint="fix the file or convert it to .jsonl") from None
        if not isinstance(rows, list):
            raise DataError(f"{path} must hold a JSON list of samples", hint="or write one sample per line (.jsonl)")
        return rows
    raise DataError(f"unsupported data file type {path.suffix!r}: {path}", hint="use .jsonl or .json")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                rows.append(json.loads(raw.decode("utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise DataError(
                    f"{path}, line {number}: not a valid UTF-8 JSON object ({exc})",
                    hint="each line of a .jsonl file must be one JSON object",
                ) from None
    return rows


# --- normalising one record -------------------------------------------------------------------


def normalize_record(record: Any, image_root: Path) -> tuple[list[dict], list[Any]]:
    """OpenAI-style messages -> (messages with bare image parts, image sources in order)."""
    if not isinstance(record, dict):
        raise SampleError("sample", f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise SampleError("messages", "missing or empty; expected a list of {role, content} turns")
    out_messages, images = [], []
    for turn_index, turn in enumerate(messages):
        where = f"messages[{turn_index}]"
        if not isinstance(turn, dict):
            raise SampleError(where, f"expected an object with role and content, got {type(turn).__name__}")
        role = turn.get("role")
        if role not in ROLES:
            raise SampleError(f"{where}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        parts = _parts(turn.get("content"), f"{where}.content", image_root, images)
        out_messages.append({"role": role, "content": parts})
    if not any(m["role"] == "assistant" for m in out_messages):
        raise SampleError("messages", "no assistant turn: there is nothing to learn from this sample")
    return out_messages, images


def _parts(content: Any, where: str, image_root: Path, images: list[Any]) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise SampleError(where, f"expected a string or a list of parts, got {type(content).__name__}")
    parts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind == "image":
            source = part.get("image", part.get("path", part.get("url")))
            if source is None:
                raise SampleError(f"{where}[{i}]", "image part without an `image` path")
            images.append(resolve_image_source(source, image_root))
            parts.append({"type": "image"})
        else:
            raise SampleError(f"{where}[{i}]", "expected {type: text, text} or {type: image, image}")
    return parts


def resolve_image_source(source: Any, image_root: Path) -> Any:
    if isinstance(source, str):
        path = Path(source).expanduser()
        return str(path if path.is_absolute() else (image_root / path).resolve())
    return source


# --- images -----------------------------------------------------------------------------------


def open_image(source: Any):
    """A decoded RGB PIL image from a path, bytes or a PIL image."""
    import io

    from PIL import Image

    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, bytes | bytearray):
        image = Image.open(io.BytesIO(source))
    elif isinstance(source, str):
        image = Image.open(source)
    else:
        raise SampleError("image", f"unsupported image source {type(source).__name__}")
    image.load()  # decode now: a truncated file fails here, not inside the processor
    return image if image.mode == "RGB" else image.convert("RGB")


# --- loading a split ----------------------------------------------------------------------------


@dataclass
class LoadedSplit:
    samples: list[Sample]
    problems: list[Problem]
    source: str
    total: int


def load_split(path: str, image_root: str | None, on_bad_sample: str) -> LoadedSplit:
    """Every valid sample of a file; invalid ones raise or are listed, per ``on_bad_sample``."""
    records = read_records(path)
    root = Path(image_root) if image_root else Path(path).resolve().parent
    samples, problems = [], []
    for index, record in enumerate(records):
        try:
            messages, images = normalize_record(record, root)
            sample = Sample(index, messages, images)
            check_images(sample)
        except SampleError as exc:
            problems.append(Problem(index, exc.field, exc.reason))
            continue
        samples.append(sample)
    if problems and on_bad_sample == "error":
        listed = "\n".join(f"  - {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise DataError(
            f"{path}: {len(problems)} of {len(records)} samples are invalid:\n{listed}{more}",
            hint="fix them, or set data.on_bad_sample: skip to train without them (they are listed in "
            "3-train/data_report.json)",
        )
    if not samples:
        raise DataError(f"{path} has no usable samples", hint="check the file holds `messages` samples")
    return LoadedSplit(samples, problems, str(path), len(records))


def check_images(sample: Sample) -> None:
    """Every image exists and decodes; released at once (never held for the whole set)."""
    for i, source in enumerate(sample.images):
        field_name = f"images[{i}]"
        if isinstance(source, str) and not Path(source).is_file():
            raise SampleError(field_name, f"file not found: {source}")
        try:
            open_image(source).close()
        except SampleError:
            raise
        except Exception as exc:  # PIL raises many types for broken files
            raise SampleError(field_name, f"cannot decode image ({type(exc).__name__}: {exc})") from None
