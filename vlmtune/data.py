"""Read samples into one shape: OpenAI-style messages plus the images they show, in order.

A ``Sample`` holds ``messages`` whose content is always a list of ``{"type": "text", "text": ...}``
and ``{"type": "image"}`` parts, and ``images``: one lazy source per image part (an absolute path,
bytes, a PIL image, a URL, or a RowImage: a reference into an Arrow-backed dataset), opened only
when the pixels are needed. Three layouts are read
(docs/data.md has examples):

- messages: OpenAI/TRL ``messages`` whose content is a string or a list of parts; an image part
  names its source inline (``{"type": "image", "image": ...}``, ``{"type": "image_url", ...}``)
  or is bare and takes the next entry of the ``images`` column.
- sharegpt: ``conversations`` (or ``messages``) with ``from``/``value`` or ``role``/``content``
  turns whose text marks each image with ``<image>``, plus an ``images`` list (or one ``image``).
- columns: plain columns (image, question, answer, system) named in ``data.columns``.

Records are read lazily (one line, one batch at a time) from .jsonl, .json, .csv, .parquet,
.arrow, a ``save_to_disk`` folder or a hub dataset. A record that cannot be read or normalised
becomes a ``Problem`` with its index, the field and the reason; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlmtune.errors import DataError
from vlmtune.images import ImageProblem, open_image, resolve_source

if TYPE_CHECKING:
    from vlmtune.recipe import DataSection

__all__ = [
    "Problem",
    "RowImage",
    "Sample",
    "SampleError",
    "SampleReader",
    "load_split",
    "open_image",
    "open_records",
]

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"human": "user", "gpt": "assistant", **{role: role for role in ROLES}}
CONVERSATION_KEYS = ("messages", "conversations")
IMAGE_KEYS = ("images", "image")
FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
BATCH_ROWS = 64  # rows decoded at a time from columnar files: memory stays flat on any size


@dataclass
class Sample:
    index: int  # position in the source, for messages users can act on
    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    image_fields: list[str] = field(default_factory=list)  # where each image came from in the record
    format: str = "messages"  # the layout it was read as: messages, sharegpt or columns

    @property
    def n_images(self) -> int:
        return len(self.images)

    def image_field(self, i: int) -> str:
        """Where image ``i`` came from in the record, for problem reports."""
        return self.image_fields[i] if i < len(self.image_fields) else f"images[{i}]"


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


# --- reading records, lazily -------------------------------------------------------------------


@dataclass
class Records:
    """The rows of one source: ``(index, record)`` pairs, read as they are iterated.

    A row that cannot even be read (a non-UTF-8 or broken JSON line) arrives as a SampleError in
    place of the record, so one bad line costs one sample, not the file.
    """

    rows: Iterable[tuple[int, Any]]
    total: int | None  # for progress bars; None when unknown without reading everything
    root: Path  # where relative image paths start by default
    source: str
    table: Any = None  # an Arrow-backed dataset whose rows can be read again (images stay there)


@dataclass(frozen=True, eq=False)
class RowImage:
    """An image stored inside row ``row`` of an Arrow-backed dataset, read again when opened.

    Kept samples hold this reference instead of the image bytes, so a set of embedded images
    costs no memory per sample; the dataset is memory-mapped (and pickles as a file reference).
    """

    table: Any
    row: int
    path: tuple  # keys and list positions from the row to the image value

    def fetch(self) -> bytes:
        value = self.table[self.row].to_pylist()[0]
        for key in self.path:
            value = value[key]
        return bytes(value["bytes"] if isinstance(value, dict) else value)

    def __repr__(self) -> str:
        return f"<row {self.row} {'.'.join(map(str, self.path))}>"


def open_records(source: str, split: str = "train", subset: str | None = None) -> Records:
    """The records of a file, a save_to_disk folder or a hub dataset, not yet read."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _dataset_records(_load_from_disk(path, split), path, str(path))
    if path.is_file():
        suffix = path.suffix.lower()
        readers = {".jsonl": _jsonl_records, ".json": _json_records, ".csv": _csv_records}
        if suffix in readers:
            return readers[suffix](path)
        if suffix == ".parquet":
            return _parquet_records(path)
        if suffix == ".arrow":
            return _arrow_records(path)
        raise DataError(
            f"unsupported data file type {path.suffix!r}: {path}",
            hint=f"use one of {', '.join(FILE_SUFFIXES)}, a save_to_disk folder or a hub dataset id",
        )
    if path.is_absolute() or source.startswith((".", "~")) or source.lower().endswith(FILE_SUFFIXES):
        raise DataError(
            f"data file not found: {source}", hint="paths in a recipe are relative to the recipe's folder"
        )
    if HUB_ID.fullmatch(source):
        return _dataset_records(_load_from_hub(source, split, subset), Path.cwd(), f"{source} [{split}]")
    raise DataError(
        f"data source not found: {source}", hint="give a data file, a save_to_disk folder or a hub id"
    )


def _jsonl_records(path: Path) -> Records:
    return Records(_jsonl_rows(path), _count_lines(path), path.resolve().parent, str(path))


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    index = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            yield index, _parse_line(raw, number)
            index += 1


def _parse_line(raw: bytes, number: int) -> Any:
    try:
        text = raw.rstrip(b"\r\n").decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return SampleError(
            f"line {number}", f"not valid UTF-8 (byte {exc.object[exc.start]:#04x} at offset {exc.start})"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        return SampleError(f"line {number}", f"not valid JSON ({exc})")


def _count_lines(path: Path) -> int:
    count, last = 0, b"\n"
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


def _json_records(path: Path) -> Records:
    try:
        rows = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not valid UTF-8 ({exc})", hint="save the file as UTF-8") from None
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # one object per line in a .json file: read it as JSON lines
            return _jsonl_records(path)
        raise DataError(
            f"{path} is not valid JSON: {exc}", hint="fix the file or convert it to .jsonl"
        ) from None
    if not isinstance(rows, list):
        raise DataError(
            f"{path} must hold a JSON list of samples", hint="or write one sample per line (.jsonl)"
        )
    return Records(enumerate(rows), len(rows), path.resolve().parent, str(path))


def _csv_records(path: Path) -> Records:
    return Records(_csv_rows(path), None, path.resolve().parent, str(path))


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        try:
            for index, row in enumerate(reader):
                yield index, {key: _csv_cell(key, value) for key, value in row.items()}
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{path}, row {reader.line_num + 1}: not valid UTF-8 ({exc.reason})",
                hint="save the file as UTF-8",
            ) from None


def _csv_cell(key: str | None, value: Any) -> Any:
    """CSV holds text only: empty cells are missing values; list-valued columns may hold JSON."""
    if value == "":
        return None
    if key in (*CONVERSATION_KEYS, "images") and isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _parquet_records(path: Path) -> Records:
    """Through `datasets` (converted once to a memory-mapped Arrow cache, as load_dataset does), so
    embedded images can stay on disk as RowImage references."""
    from datasets import Dataset

    try:
        dataset = Dataset.from_parquet(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(f"{path} is not a readable parquet file ({exc})", hint="re-export it") from None
    return _dataset_records(dataset, path.resolve().parent, str(path))


def _arrow_records(path: Path) -> Records:
    from datasets import Dataset

    try:
        dataset = Dataset.from_file(str(path))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
        raise DataError(
            f"{path} is not an Arrow file written by datasets ({exc})", hint="re-save it with save_to_disk"
        ) from None
    return _dataset_records(dataset, path.resolve().parent, str(path))


def _dataset_records(dataset: Any, root: Path, source: str) -> Records:
    """Rows of a `datasets` Dataset as plain Python, a batch at a time.

    Arrow rows, not the formatted ones: Image features stay {"bytes", "path"} dicts (decoded
    later, one at a time) instead of every image being decoded into a PIL image on access.
    """

    arrow = dataset.with_format("arrow")

    def rows() -> Iterator[tuple[int, Any]]:
        index = 0
        for batch in arrow.iter(batch_size=BATCH_ROWS):
            for row in batch.to_pylist():
                yield index, row
                index += 1

    return Records(rows(), len(dataset), root, source, table=arrow)


def _load_from_disk(path: Path, split: str) -> Any:
    import datasets

    if not any((path / name).is_file() for name in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(
            f"{path} is a folder but not a dataset written by datasets' save_to_disk",
            hint="point data.train at a data file or at the folder save_to_disk wrote",
        )
    loaded = datasets.load_from_disk(str(path))
    return _pick_split(loaded, split, str(path))


def _load_from_hub(name: str, split: str, subset: str | None) -> Any:  # pragma: no cover (needs the network)
    import datasets

    try:
        return datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise DataError(
            f"cannot load hub dataset {name!r} (subset {subset!r}, split {split!r}): {exc}",
            hint="check the id, data.subset and data.train_split/eval_split; offline, save it with "
            "save_to_disk and point the recipe at that folder",
        ) from None


def _pick_split(loaded: Any, split: str, source: str) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    if split not in loaded:
        raise DataError(
            f"{source} has no split {split!r}; it has {', '.join(loaded.keys())}",
            hint="set data.train_split / data.eval_split to one of them",
        )
    return loaded[split]


# --- normalising one record ----------------------------------------------------------------------


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


# --- images --------------------------------------------------------------------------------------


def check_images(sample: Sample, max_side: int | None = None) -> None:
    """Every image exists and decodes; each is released at once (never held for the whole set)."""
    for i, source in enumerate(sample.images):
        try:
            image = open_image(source, max_side=max_side)
        except ImageProblem as exc:
            raise SampleError(sample.image_field(i), exc.reason) from None
        if image is not source:
            image.close()


# --- a whole split, without the model (tests, benchmarks) --------------------------------------


@dataclass
class LoadedSplit:
    samples: list[Sample]
    problems: list[Problem]
    source: str
    total: int


def load_split(
    path: str, image_root: str | None = None, on_bad_sample: str = "error", data: DataSection | None = None
) -> LoadedSplit:
    """Every valid sample of a source (images decoded once to check them, then released).

    Invalid samples raise or are listed, per ``on_bad_sample``. ``data`` (a recipe's DataSection)
    replaces the other keyword arguments when given. Token lengths need the processor:
    ``vlmtune.preflight.check_split`` measures them too.
    """
    from vlmtune.recipe import DataSection

    data = data or DataSection(train=path, image_root=image_root, on_bad_sample=on_bad_sample)
    records = open_records(path, data.train_split, data.subset)
    reader = SampleReader.from_section(data, records.root, records.table)
    samples, problems, total = [], [], 0
    for index, record in records.rows:
        total += 1
        try:
            sample = reader.read(index, record)
            check_images(sample, data.max_image_side)
        except SampleError as exc:
            problems.append(Problem(index, exc.field, exc.reason))
            continue
        samples.append(sample)
    if problems and data.on_bad_sample == "error":
        raise invalid_samples_error(records.source, problems, total)
    if not samples:
        raise DataError(
            f"{records.source} has no usable samples", hint="see docs/data.md for the layouts read"
        )
    return LoadedSplit(samples, problems, records.source, total)


def invalid_samples_error(source: str, problems: list[Problem], total: int) -> DataError:
    listed = "\n".join(f"  - {p}" for p in problems[:20])
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return DataError(
        f"{source}: {len(problems)} of {total} samples are invalid:\n{listed}{more}",
        hint="fix them (`vlmtune data check RECIPE` lists every one), or set data.on_bad_sample: skip to train "
        "without them (they are listed in 3-train/data_report.json)",
    )
