"""Read raw corpus rows from JSONL, JSON, Parquet files, folders of them, and `datasets` folders.

Reading never stops at a bad row: each row comes back as an `InputRecord` that holds either the
parsed row or the reason it could not be read, with where it came from (file and line or row).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}


class InputError(FileNotFoundError):
    """An input path that does not exist or cannot be read as a corpus; the message names it."""


@dataclass(frozen=True)
class InputSource:
    """One readable input: a file, or a folder written by `datasets.Dataset.save_to_disk`."""

    path: Path
    format: str  # jsonl | json | parquet | hf_dataset

    def files(self) -> list[Path]:
        """The files whose content defines this input (for fingerprints)."""
        if self.format != "hf_dataset":
            return [self.path]
        return sorted(p for p in self.path.rglob("*") if p.is_file())


@dataclass(frozen=True)
class InputRecord:
    """One input row: `row` when it parsed, else `reason` and `detail` saying why not."""

    input_file: str
    locator: str
    row: dict[str, Any] | None = None
    reason: str | None = None
    detail: str | None = None


def _is_hf_dataset(folder: Path) -> bool:
    return (folder / "dataset_dict.json").is_file() or (
        (folder / "state.json").is_file() and (folder / "dataset_info.json").is_file()
    )


def resolve_inputs(paths: list[Path]) -> list[InputSource]:
    """Expand the given paths into readable inputs, in a deterministic order.

    Folders are searched recursively for .jsonl/.ndjson/.json/.parquet files; a folder written by
    `save_to_disk` is read as one dataset. A missing path, or a file of another type named
    explicitly, is an `InputError`.
    """
    sources: list[InputSource] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise InputError(f"input {path} does not exist")
        if path.is_file():
            if path.suffix.lower() not in FILE_FORMATS:
                raise InputError(
                    f"input {path} has an unsupported extension; expected one of {', '.join(sorted(FILE_FORMATS))}"
                    " or a datasets folder"
                )
            sources.append(InputSource(path, FILE_FORMATS[path.suffix.lower()]))
        elif _is_hf_dataset(path):
            sources.append(InputSource(path, "hf_dataset"))
        else:
            sources.extend(_sources_in_folder(path))
    return sources


def _sources_in_folder(folder: Path) -> list[InputSource]:
    sources = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            sources.extend([InputSource(child, "hf_dataset")] if _is_hf_dataset(child) else _sources_in_folder(child))
        elif child.suffix.lower() in FILE_FORMATS:
            sources.append(InputSource(child, FILE_FORMATS[child.suffix.lower()]))
    return sources


def iter_records(source: InputSource) -> Iterator[InputRecord]:
    """Every row of one input, in order, bad rows included (as records with a reason)."""
    readers = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "hf_dataset": _read_hf_dataset}
    yield from readers[source.format](source.path)


def _parse_json_line(name: str, locator: str, raw: bytes) -> InputRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return InputRecord(name, locator, reason="undecodable_bytes", detail=f"not valid UTF-8 ({error.reason} at byte {error.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return InputRecord(name, locator, reason="invalid_json", detail=f"malformed JSON: {error.msg} at column {error.colno}")
    if not isinstance(value, dict):
        return InputRecord(name, locator, reason="invalid_json", detail=f"expected a JSON object, got {type(value).__name__}")
    return InputRecord(name, locator, row=value)


def _read_jsonl(path: Path) -> Iterator[InputRecord]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield _parse_json_line(str(path), f"line {number}", raw.strip())


def _read_json(path: Path) -> Iterator[InputRecord]:
    """A JSON array of objects (or an object holding one array). Files that are really JSONL are read as such."""
    raw = path.read_bytes()
    if not raw.strip():
        return
    try:
        value = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        yield InputRecord(str(path), "file", reason="undecodable_bytes", detail=f"file is not valid UTF-8 ({error.reason} at byte {error.start})")
        return
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values, one per line: JSON Lines under a .json name
            yield from _read_jsonl(path)
        else:
            yield InputRecord(str(path), "file", reason="invalid_json", detail=f"malformed JSON: {error.msg} at line {error.lineno}")
        return
    if isinstance(value, dict):
        arrays = [v for v in value.values() if isinstance(v, list)]
        if len(arrays) != 1:
            yield InputRecord(str(path), "file", reason="invalid_json", detail="expected a JSON array of row objects (or an object holding exactly one array)")
            return
        value = arrays[0]
    if not isinstance(value, list):
        yield InputRecord(str(path), "file", reason="invalid_json", detail=f"expected a JSON array of row objects, got {type(value).__name__}")
        return
    for index, row in enumerate(value):
        if isinstance(row, dict):
            yield InputRecord(str(path), f"row {index}", row=row)
        else:
            yield InputRecord(str(path), f"row {index}", reason="invalid_json", detail=f"expected a JSON object, got {type(row).__name__}")


def _read_parquet(path: Path) -> Iterator[InputRecord]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        yield InputRecord(str(path), "file", reason="unreadable_file", detail=f"not a readable Parquet file: {error}")
        return
    index = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield InputRecord(str(path), f"row {index}", row=row)
            index += 1


def _read_hf_dataset(path: Path) -> Iterator[InputRecord]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises many types for a damaged folder
        yield InputRecord(str(path), "file", reason="unreadable_file", detail=f"not a readable datasets folder: {error}")
        return
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        prefix = f"{split}/" if split else ""
        for index, row in enumerate(dataset):
            yield InputRecord(str(path), f"{prefix}row {index}", row=dict(row))
