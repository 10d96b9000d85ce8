"""Reading the records of a data source lazily: .jsonl, .json, .csv, .parquet, .arrow, a
``save_to_disk`` folder or a hub dataset, one line or one batch at a time.

A row that cannot even be read (a non-UTF-8 or broken JSON line) arrives as a SampleError in
place of the record, so one bad line costs one sample, not the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmtune.data.images import embedded_bytes
from vlmtune.data.samples import SampleError
from vlmtune.errors import DataError
from vlmtune.paths import DATA_SUFFIXES, is_hub_id, written_as_path
from vlmtune.redact import redact_text

CONVERSATION_KEYS = ("messages", "conversations", "conversation")  # in order of preference
JSON_CELLS = (*CONVERSATION_KEYS, "texts", "images", "history")  # list-valued columns a CSV holds as JSON
BATCH_ROWS = 64  # rows decoded at a time from columnar files: memory stays flat on any size


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
    encoding: str | None = None  # "base64" for a bare base64 string; data URIs are recognised as such

    def fetch(self) -> bytes:
        value = self.table[self.row].to_pylist()[0]
        for key in self.path:
            value = value[key]
        return embedded_bytes(value, self.encoding)

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
            hint=f"use one of {', '.join(DATA_SUFFIXES)}, a save_to_disk folder or a hub dataset id",
        )
    if path.is_absolute() or written_as_path(source):
        raise DataError(
            f"data file not found: {redact_text(source)}",
            hint="paths in a recipe are relative to the recipe's folder",
        )
    if is_hub_id(source):
        return _dataset_records(_load_from_hub(source, split, subset), Path.cwd(), f"{source} [{split}]")
    raise DataError(
        f"data source not found: {redact_text(source)}",
        hint="give a data file, a save_to_disk folder or a hub id (vlmtune does not download data files from URLs)",
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
    if key in JSON_CELLS and isinstance(value, str) and value.lstrip().startswith("["):
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

    from vlmtune.data.locate import SPLIT_FALLBACKS

    try:
        try:
            return datasets.load_dataset(name, subset, split=split)
        except ValueError as exc:  # an unknown split; eval_split's validation falls back to test
            if split not in SPLIT_FALLBACKS or "split" not in str(exc).lower():
                raise
            return datasets.load_dataset(name, subset, split=SPLIT_FALLBACKS[split])
    except Exception as exc:  # offline, unknown id, unknown split: datasets raises many types
        raise DataError(
            f"cannot load hub dataset {name!r} (subset {subset!r}, split {split!r}): {exc}",
            hint="check the id, data.subset and data.train_split/eval_split; offline, save it with "
            "save_to_disk and point the recipe at that folder",
        ) from None


def _pick_split(loaded: Any, split: str, source: str) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset, not a DatasetDict
        return loaded
    from vlmtune.data.locate import pick_split

    chosen = pick_split(split, list(loaded.keys()))  # eval_split's validation falls back to test
    if chosen is None:
        raise DataError(
            f"{source} has no split {split!r}; it has {', '.join(loaded.keys())}",
            hint="set data.train_split / data.eval_split to one of them",
        )
    return loaded[chosen]
