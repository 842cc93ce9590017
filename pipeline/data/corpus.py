"""Read raw corpus rows from JSONL, JSON, Parquet files, folders of them, and `datasets` folders.

Reading never stops at a bad row: each row comes back as an `InputRecord` that holds either the
parsed row or the reason it could not be read, with where it came from (file and line or row).
Work per row is bounded: a row larger than `max_row_bytes` is rejected as `row_too_large` before
it is parsed (JSONL is read line by line in bounded pieces), and each row of a damaged Parquet row
group is a rejection, after which the file's other row groups are still read.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError

logger = logging.getLogger(__name__)

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet"}

# Deeper rows are rejected (chat rows nest 3 to 5 levels); far below what exhausts Python's stack.
MAX_NESTING = 100
_BOM = b"\xef\xbb\xbf"
# First bytes of files that are not JSON text, and what to tell the user.
_MAGIC = {
    b"PAR1": "a Parquet file (name it .parquet)",
    b"\x1f\x8b": "gzip-compressed (decompress it first)",
    b"PK\x03\x04": "a zip archive (extract it first)",
    b"\x28\xb5\x2f\xfd": "zstd-compressed (decompress it first)",
}
# Skipping the rest of an over-long line reads this much at a time.
_SKIP_CHUNK = 1 << 20
# A Parquet batch holds about this many bytes, so a file of huge rows is read a few rows at a time.
_BATCH_BYTES = 64 << 20
# A JSON string, or one of the characters that shape an array; used to split an array into entries.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]')
_SURROGATE = re.compile("[\ud800-\udfff]")


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
    `save_to_disk` is read as one dataset. Symbolic links are followed, but each real folder is
    searched once and each real file is read once (a file given twice, or reached through a link,
    is logged and skipped). A missing path, or a file of another type named explicitly, is an
    `UserError`.
    """
    sources: list[InputSource] = []
    first_by_real_path: dict[Path, Path] = {}
    for raw in paths:
        for source in _sources_of(Path(raw)):
            _require_utf8_name(source.path)
            real = source.path.resolve()
            if real in first_by_real_path:
                logger.warning("input %s is the same file as %s (given more than once, or linked); it is read once",
                               source.path, first_by_real_path[real])
                continue
            first_by_real_path[real] = source.path
            sources.append(source)
    return sources


def _require_utf8_name(path: Path) -> None:
    """Refuse a path whose name is not valid UTF-8: it could not be recorded in the manifest or rejected.parquet."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(f"input {shown} has a name that is not valid UTF-8; rename it") from None


def _sources_of(path: Path) -> list[InputSource]:
    if not path.exists():
        raise UserError(f"input {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise UserError(
                f"input {path} has an unsupported extension; expected one of {', '.join(sorted(FILE_FORMATS))}"
                " or a datasets folder"
            )
        return [InputSource(path, FILE_FORMATS[path.suffix.lower()])]
    if _is_hf_dataset(path):
        return [InputSource(path, "hf_dataset")]
    return _sources_in_folder(path, searched=set())


def _sources_in_folder(folder: Path, searched: set[Path]) -> list[InputSource]:
    """Corpus files under `folder`, sorted; a real folder already in `searched` (a link loop) is skipped."""
    real = folder.resolve()
    if real in searched:
        return []
    searched.add(real)
    sources = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_dir():
            sources.extend([InputSource(child, "hf_dataset")] if _is_hf_dataset(child) else _sources_in_folder(child, searched))
        elif child.is_file() and child.suffix.lower() in FILE_FORMATS:
            sources.append(InputSource(child, FILE_FORMATS[child.suffix.lower()]))
    return sources


def iter_records(source: InputSource, max_row_bytes: int | None = None) -> Iterator[InputRecord]:
    """Every row of one input, in order, bad rows included (as records with a reason).

    A row over `max_row_bytes` (the JSON text of a JSONL line or JSON array entry; the text and
    binary values of a Parquet or datasets row) is rejected as `row_too_large`; None: no limit.
    """
    readers = {"jsonl": _read_jsonl, "json": _read_json, "parquet": _read_parquet, "hf_dataset": _read_hf_dataset}
    yield from readers[source.format](source.path, max_row_bytes)


def _too_large(name: str, locator: str, size: int, limit: int) -> InputRecord:
    return InputRecord(name, locator, reason="row_too_large",
                       detail=f"row is {size} bytes, over the limit of {limit} bytes (setting max_row_bytes)")


def _not_json_text(name: str, head: bytes) -> InputRecord | None:
    """A file-level rejection when the first bytes show a binary format rather than JSON text."""
    for magic, what in _MAGIC.items():
        if head.startswith(magic):
            return InputRecord(name, "file", reason="unreadable_file", detail=f"not JSON text: the file looks like {what}")
    return None


def _json_row(name: str, locator: str, value: Any) -> InputRecord:
    """A parsed JSON value as a row, or the reason it cannot be one."""
    if not isinstance(value, dict):
        return InputRecord(name, locator, reason="invalid_json", detail=f"expected a JSON object, got {type(value).__name__}")
    problem = _structure_problem(value)
    if problem is not None:
        return InputRecord(name, locator, reason=problem[0], detail=problem[1])
    return InputRecord(name, locator, row=value)


def _structure_problem(value: Any) -> tuple[str, str] | None:
    """Nesting deeper than `MAX_NESTING`, or a string holding a lone surrogate (a `\\ud800` escape).

    Lone surrogates are not characters: UTF-8 cannot store them, so the tokenizer and the Parquet
    writer would fail on them later, far from the row.
    """
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_NESTING:
            return "too_deeply_nested", f"the row nests more than {MAX_NESTING} levels deep"
        if isinstance(node, str):
            found = _SURROGATE.search(node)
            if found:
                return "invalid_unicode", (
                    f"a string holds a lone surrogate (U+{ord(found.group()):04X}, from a \\u escape), which is not"
                    " a character and cannot be stored as UTF-8"
                )
        elif isinstance(node, dict):
            pending.extend((item, depth + 1) for pair in node.items() for item in pair)
        elif isinstance(node, list):
            pending.extend((item, depth + 1) for item in node)
    return None


def _parse_json_row(name: str, locator: str, raw: bytes) -> InputRecord:
    """One row from its raw JSON bytes (a JSONL line or a JSON array entry)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return InputRecord(name, locator, reason="undecodable_bytes", detail=f"not valid UTF-8 ({error.reason} at byte {error.start})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return InputRecord(name, locator, reason="invalid_json", detail=f"malformed JSON: {error.msg} at column {error.colno}")
    except RecursionError:
        return InputRecord(name, locator, reason="too_deeply_nested", detail="the row nests deeper than Python can parse")
    return _json_row(name, locator, value)


def _read_jsonl(path: Path, limit: int | None) -> Iterator[InputRecord]:
    name = str(path)
    with open(path, "rb") as handle:
        head = handle.read(4)
        rejection = _not_json_text(name, head)
        if rejection is not None:
            yield rejection
            return
        handle.seek(len(_BOM) if head.startswith(_BOM) else 0)
        for number, raw, size in _bounded_lines(handle, limit):
            if raw is None:
                yield _too_large(name, f"line {number}", size, limit)
            elif raw.strip():
                yield _parse_json_row(name, f"line {number}", raw.strip())


def _bounded_lines(handle: BinaryIO, limit: int | None) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line or None when over `limit` bytes, its size); never holds more than `limit` bytes."""
    number = 0
    while raw := handle.readline(-1 if limit is None else limit + 2):  # + 2: room for a CRLF ending
        number += 1
        content = len(raw.rstrip(b"\r\n"))
        if limit is None or content <= limit:
            yield number, raw, content
            continue
        size = content
        while not raw.endswith(b"\n") and (raw := handle.readline(_SKIP_CHUNK)):
            size += len(raw.rstrip(b"\r\n"))
        yield number, None, size


def _read_json(path: Path, limit: int | None) -> Iterator[InputRecord]:
    """A JSON array of objects (or an object holding one array). Files that are really JSONL are read as such.

    The file is read whole; an array is split into its entries before parsing, so each entry is
    its own row: a bad entry is one rejection, and its neighbours are still read.
    """
    name = str(path)
    data = path.read_bytes()
    rejection = _not_json_text(name, data[:4])
    if rejection is not None:
        yield rejection
        return
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    body = data.lstrip()
    if not body:
        return
    if body.startswith(b"["):
        yield from _read_json_array(name, data, len(data) - len(body), limit)
    else:
        yield from _read_json_document(path, data, limit)


def _read_json_array(name: str, data: bytes, opening: int, limit: int | None) -> Iterator[InputRecord]:
    closed_at = None
    for index, (begin, end, closed_at) in enumerate(_array_entries(data, opening)):
        locator, raw = f"row {index}", data[begin:end].strip()
        if not raw and closed_at is not None:  # `[]`, or a trailing comma before `]`
            continue
        if not raw:
            unclosed = end == len(data)
            yield InputRecord(name, locator, reason="invalid_json", detail="malformed JSON: "
                              + ("the array is never closed with ']'" if unclosed else "nothing between two commas"))
        elif limit is not None and len(raw) > limit:
            yield _too_large(name, locator, len(raw), limit)
        else:
            yield _parse_json_row(name, locator, raw)
    if closed_at is not None and data[closed_at + 1 :].strip():
        yield InputRecord(name, "after the array", reason="invalid_json", detail="malformed JSON: extra data after the closing ']'")


def _array_entries(data: bytes, opening: int) -> Iterator[tuple[int, int, int | None]]:
    """(begin, end, position of the closing ']' or None) of each entry of the array opening at `opening`.

    Only strings and brackets are looked at, so a malformed entry still ends at the next comma
    outside brackets; an array never closed ends its last entry at the end of the file.
    """
    depth, begin = 0, opening + 1
    for token in _JSON_TOKEN.finditer(data, opening + 1):
        kind = token.group()
        if kind in (b"[", b"{"):
            depth += 1
        elif kind in (b"]", b"}") and depth > 0:
            depth -= 1
        elif kind == b"," and depth == 0:
            yield begin, token.start(), None
            begin = token.end()
        elif kind == b"]":
            yield begin, token.start(), token.start()
            return
    yield begin, len(data), None


def _read_json_document(path: Path, data: bytes, limit: int | None) -> Iterator[InputRecord]:
    """A .json file that is not an array: an object holding one array of rows, or JSON Lines."""
    name = str(path)
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        yield InputRecord(name, "file", reason="undecodable_bytes", detail=f"file is not valid UTF-8 ({error.reason} at byte {error.start})")
        return
    except RecursionError:
        yield InputRecord(name, "file", reason="too_deeply_nested", detail="the file nests deeper than Python can parse")
        return
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # several JSON values, one per line: JSON Lines under a .json name
            yield from _read_jsonl(path, limit)
        else:
            yield InputRecord(name, "file", reason="invalid_json", detail=f"malformed JSON: {error.msg} at line {error.lineno}")
        return
    arrays = [v for v in value.values() if isinstance(v, list)] if isinstance(value, dict) else []
    if len(arrays) != 1:
        yield InputRecord(name, "file", reason="invalid_json", detail="expected a JSON array of row objects (or an object holding exactly one array)")
        return
    for index, entry in enumerate(arrays[0]):
        yield _sized(name, f"row {index}", entry, limit) or _json_row(name, f"row {index}", entry)


def _row_bytes(value: Any) -> int:
    """Bytes of the text and binary values of a parsed row (its size, as far as work on it goes)."""
    total, pending = 0, [value]
    while pending:
        node = pending.pop()
        if isinstance(node, str):
            total += len(node) if node.isascii() else len(node.encode("utf-8", "surrogatepass"))
        elif isinstance(node, (bytes, bytearray)):
            total += len(node)
        elif isinstance(node, dict):
            pending.extend(node.values())
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return total


def _sized(name: str, locator: str, row: Any, limit: int | None) -> InputRecord | None:
    """A `row_too_large` rejection when an already-parsed row is over the limit, else None."""
    if limit is None:
        return None
    size = _row_bytes(row)
    return _too_large(name, locator, size, limit) if size > limit else None


def _read_parquet(path: Path, limit: int | None) -> Iterator[InputRecord]:
    """Rows of a Parquet file, row group by row group: each row of a damaged group that was not read
    is a rejection of its own (so rows read counts the file's rows, as its metadata states); the
    other groups are read."""
    name = str(path)
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as error:
        yield InputRecord(name, "file", reason="unreadable_file", detail=f"not a readable Parquet file: {_one_line(error)}")
        return
    first = 0
    for group in range(parquet.metadata.num_row_groups):
        metadata = parquet.metadata.row_group(group)
        index = first
        try:
            for batch in parquet.iter_batches(batch_size=_batch_rows(metadata), row_groups=[group]):
                for row in batch.to_pylist():
                    yield _sized(name, f"row {index}", row, limit) or InputRecord(name, f"row {index}", row=row)
                    index += 1
        except (pa.ArrowException, OSError) as error:
            last = first + metadata.num_rows - 1
            detail = f"Parquet row group {group} is damaged, rows {index} to {last} not read: {_one_line(error)}"
            for lost in range(index, last + 1):
                yield InputRecord(name, f"row {lost}", reason="unreadable_file", detail=detail)
        first += metadata.num_rows


def _batch_rows(row_group: Any) -> int:
    """Rows per batch so that a batch holds about `_BATCH_BYTES` (at least 1, at most 4096 rows)."""
    average = row_group.total_byte_size / max(row_group.num_rows, 1)
    return max(1, min(4096, int(_BATCH_BYTES // max(average, 1))))


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_hf_dataset(path: Path, limit: int | None) -> Iterator[InputRecord]:
    import datasets

    name = str(path)
    try:
        loaded = datasets.load_from_disk(name)
    except Exception as error:  # datasets raises many types for a damaged folder
        yield InputRecord(name, "file", reason="unreadable_file", detail=f"not a readable datasets folder: {_one_line(error)}")
        return
    splits = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [(None, loaded)]
    for split, dataset in splits:
        prefix = f"{split}/" if split else ""
        for index, row in enumerate(dataset):
            locator = f"{prefix}row {index}"
            yield _sized(name, locator, row, limit) or InputRecord(name, locator, row=dict(row))
