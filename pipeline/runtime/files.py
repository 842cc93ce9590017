"""Artifact IO: shard names, atomic writes, manifests, validation and an exclusive output lock."""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import pyarrow as pa
import pydantic
import pyarrow.parquet as pq

import pipeline
from pipeline.runtime.errors import UserError
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.schemas import SchemaError, validate_json, validate_manifest, validate_table

MANIFEST = "manifest.json"
RecordModel = TypeVar("RecordModel", bound=pydantic.BaseModel)
# What `sstoken prepare` sets aside beside its shards, one row per rejected input row with its reason.
REJECTED = "rejected.parquet"


class ArtifactError(UserError):
    """An artifact folder or file that is missing, corrupt or inconsistent; the message names it."""


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def _temporary_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _fsync_and_replace(temporary: Path, path: Path) -> None:
    with open(temporary, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def write_parquet(table: pa.Table, path: Path) -> None:
    """The one way our shards are written: zstd Parquet."""
    pq.write_table(table, path, compression="zstd")


def write_parquet_atomic(table: pa.Table, path: Path, before_rename: Callable[[str], None] | None = None) -> str:
    """Write `table` to `path` as Parquet, atomically (see `write_file_atomic`); returns its sha256."""
    return write_file_atomic(lambda temporary: write_parquet(table, temporary), path, before_rename)


def write_file_atomic(write: Callable[[Path], None], path: Path, before_rename: Callable[[str], None] | None = None) -> str:
    """`write(temporary)` makes the whole file under a temporary name, then it is renamed to `path`;
    returns the file's sha256.

    `before_rename(sha256)` runs once the complete file exists under its temporary name and before
    it takes `path`: a stage records that it owns `path` there, so no killed write ever leaves a
    file of ours that nothing names.
    """
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        write(temporary)
        digest = sha256_file(temporary)
        if before_rename is not None:
            before_rename(digest)
        _fsync_and_replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return digest


def write_text_atomic(text: str, path: Path) -> None:
    """Write `text` (UTF-8) to `path` via a temporary name and rename: a reader sees the old file or the new one."""
    path = Path(path)
    temporary = _temporary_sibling(path)
    try:
        temporary.write_text(text, encoding="utf-8")
        _fsync_and_replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_json_atomic(value: Any, path: Path) -> None:
    write_text_atomic(json.dumps(value, indent=2, sort_keys=False, ensure_ascii=False) + "\n", path)


# `.{name}.tmp-{pid}-{hex}`: the temporary names `_temporary_sibling` gives, and only those.
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+-[0-9a-f]+$")


def is_temporary(name: str) -> bool:
    """True for the name of one of our own unfinished atomic writes."""
    return bool(_TEMPORARY.match(name))


def remove_stale_temporaries(folder: Path) -> None:
    """Delete leftovers of our writes that were killed before their rename (nothing else)."""
    for leftover in Path(folder).glob(".*.tmp-*"):
        if is_temporary(leftover.name):
            leftover.unlink(missing_ok=True)


def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    version = pipeline.__version__
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(pipeline.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{version}+g{commit}" if commit else version


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Validate against the manifest schema, then write atomically; the manifest is written last."""
    validate_manifest(manifest)
    write_json_atomic(manifest, Path(folder) / MANIFEST)


def read_manifest(folder: Path, kind: str | None = None) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a finished sstoken artifact folder")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a manifest: it holds a JSON {type(manifest).__name__}, not an object")
    validate_manifest(manifest, source=str(path))
    if kind is not None and manifest["kind"] != kind:
        raise ArtifactError(f"{folder} holds a '{manifest['kind']}' artifact, expected '{kind}'")
    refuse_names_outside(manifest, path)
    _refuse_repeated_shards(manifest, path)
    return manifest


def is_plain_name(name: object) -> bool:
    """True for a file name that stays inside its folder: no separator, not `.`/`..`, not empty. Every name a
    manifest or a progress record gives is checked with this before it is joined to a folder."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in ("/", "\\", "\0"))
    )


def listed_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry a manifest lists: its shards and single files such as `rejected`."""
    singles = [v for v in manifest.values() if isinstance(v, dict) and {"file", "sha256", "rows"} <= set(v)]
    return [*manifest["shards"], *singles]


def refuse_names_outside(manifest: dict[str, Any], source: Path | str) -> None:
    """Raise, naming the field, when a file a manifest lists is not a plain name inside its folder
    (`../victim.txt`, an absolute path): a stage deletes the files its old manifest lists, so such a
    name would make it delete outside its folder."""
    singles = {key: value for key, value in manifest.items() if isinstance(value, dict) and {"file", "sha256", "rows"} <= set(value)}
    fields = [(f"shards/{i}/file", entry.get("file")) for i, entry in enumerate(manifest["shards"])]
    fields += [(f"{key}/file", entry.get("file")) for key, entry in singles.items()]
    for where, name in fields:
        if not is_plain_name(name):
            raise ArtifactError(
                f"{source} lists {name!r} at {where}, which is not a file name inside its folder; the manifest was "
                "edited or is corrupt: rerun the stage that made it"
            )


def read_json_record(path: Path, schema_file: str, what: str, model: type[RecordModel]) -> RecordModel:
    """A record file (run.json, eval.json, a cell's measures) read as `model`, after checking it against
    `schemas/<schema_file>`. A folder where the file should be, an unreadable file, text that is not JSON or a value
    that does not match becomes one error naming the file (and the field): `what` says what it should have been."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not {what}; move it away")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path} does not exist; it should hold {what}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not {what}: not readable as JSON ({error})") from None
    validate_json(value, schema_file, str(path))
    try:
        return model.model_validate(value)
    except pydantic.ValidationError as error:  # the schema let through what the type refuses: name the field
        first = error.errors()[0]
        where = "/".join(str(p) for p in first["loc"]) or "(top level)"
        raise SchemaError(f"{path} does not match {schema_file} at {where}: {first['msg']}") from None


def _refuse_repeated_shards(manifest: dict[str, Any], path: Path) -> None:
    files = [entry["file"] for entry in manifest["shards"]]
    repeated = sorted({name for name in files if files.count(name) > 1})
    if repeated:
        raise ArtifactError(f"{path} lists {', '.join(repeated)} more than once; the manifest was edited or is corrupt")


def file_rows(path: Path) -> int:
    """Rows of a data file, by its kind: Parquet (its metadata), JSON Lines (its lines) or an Arrow
    stream (a `datasets` save_to_disk file). Raises ArtifactError when the file cannot be read as one."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            with open(path, "rb") as handle:
                return sum(1 for line in handle if line.strip())
        if path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                return pa.ipc.open_stream(source).read_all().num_rows
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as error:
        kind = {".jsonl": "JSON Lines", ".arrow": "Arrow stream"}.get(path.suffix, "Parquet")
        raise ArtifactError(f"{path} is not a readable {kind} file: {error}") from error


def read_data_file(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A data file as a table, by its kind (see `file_rows`); JSON Lines take the types pyarrow infers."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            import pyarrow.json as pa_json

            table = pa_json.read_json(path)
        elif path.suffix == ".arrow":
            with pa.memory_map(str(path)) as source:
                table = pa.ipc.open_stream(source).read_all()
        else:
            return pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ArtifactError(f"{path} is not a readable data file: {error}") from error
    return table.select(columns) if columns is not None else table


def shard_is_valid(path: Path, expected_sha256: str | None = None, expected_rows: int | None = None) -> bool:
    """True when the shard exists, reads as its kind of file and matches the recorded checksum and row count."""
    path = Path(path)
    if not path.is_file():
        return False
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        return False
    try:
        rows = file_rows(path)
    except ArtifactError:
        return False
    return expected_rows is None or rows == expected_rows


def read_shard(path: Path, schema_name: str, columns: list[str] | None = None) -> pa.Table:
    """Read one shard and check it against its schema file."""
    try:
        table = pq.read_table(path, columns=columns)
    except (pa.ArrowException, OSError) as error:
        raise ArtifactError(f"{path} is not a readable Parquet file: {error}") from error
    if columns is None:
        validate_table(table, schema_name, source=str(path))
    return table


def verify_listed_shard(folder: Path, entry: dict[str, Any]) -> None:
    """Raise, naming the file, unless the shard a manifest entry lists exists with its checksum and row count."""
    path = Path(folder) / entry["file"]
    manifest = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{path} is missing; rerun the stage that made {folder}")
    if sha256_file(path) != entry["sha256"]:
        raise ArtifactError(
            f"{path} does not match the checksum in {manifest}; it changed or is corrupt: rerun the stage that made it"
        )
    rows = file_rows(path)
    if rows != entry["rows"]:
        raise ArtifactError(
            f"{manifest} says {entry['file']} has {entry['rows']} rows, the file has {rows}; "
            "the manifest was edited or is corrupt: rerun the stage that made it"
        )


def refuse_repeated_sample_ids(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise, naming the id and both shards, when a sample id occurs twice in the shards a manifest lists
    (joins between stages go by sample id, so a repeated one would be trained or scored twice)."""
    seen: dict[str, str] = {}
    for entry in manifest["shards"]:
        path = Path(folder) / entry["file"]
        try:
            ids = read_data_file(path, columns=["sample_id"]).column("sample_id").to_pylist()
        except (ArtifactError, KeyError) as error:
            raise ArtifactError(f"{path} has no readable sample_id column: {error}") from error
        for sample_id in ids:
            if sample_id in seen:
                raise ArtifactError(
                    f"{Path(folder) / MANIFEST} holds sample id {sample_id!r} twice ({seen[sample_id]} and "
                    f"{entry['file']}); sample ids must be unique: rerun the stage that made {folder}"
                )
            seen[sample_id] = entry["file"]


def verify_shards(folder: Path, manifest: dict[str, Any]) -> None:
    """Raise, naming the file, if any shard the manifest lists is missing or differs from its entry."""
    for entry in manifest["shards"]:
        verify_listed_shard(folder, entry)


@contextmanager
def exclusive_output(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on an output folder, refusing a second writer with a clear message.

    The lock is an OS file lock, released when the holder exits or is killed, so a crashed run
    never leaves a stale lock behind.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / ".lock", "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise ArtifactError(
                f"{folder} is being written by {holder}; wait for it to finish or choose another output folder"
            ) from error
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def base_manifest(kind: str, config: dict[str, Any]) -> dict[str, Any]:
    """Fields every manifest starts with."""
    return {
        "schema_version": 1,
        "kind": kind,
        "created_at": utc_now(),
        "code_version": code_version(),
        "config": config,
    }
