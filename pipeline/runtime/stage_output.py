"""The exactly-once output folder of every stage that writes, and the one summary every stage returns.

Stages do not open a `StageOutput` themselves: `pipeline.runtime.stage_runner.run_stage` holds it
and runs the protocol (refusals, skip-if-done, begin, the stage's work, finish). What a stage's
work calls on it:

    out.done(name, key)                          # skip-if-done: the record of a file committed under `key`
    out.commit(name, table, {"run_key": key})    # a Parquet file, atomically, with its record
    out.commit_file(name, write, rows, record)   # any data file, the same way
    out.record_entry(name, record)               # what an entry (a fixed name: a datasets file) now holds
    out.installed(name, fingerprint_of)          # an entry folder this run already put in place, unchanged
    out.install(name, folder, fingerprint)       # a complete folder renamed to an entry (a checkpoint)

The folder: `part-*.parquet` shards (and other files a stage commits), one `_progress/<file>.json`
record per committed file (its run key, sha256 and row count), `manifest.json`, and `.lock`.

Ownership: a stage owns only the files its own manifest or progress records name (plus the lock,
the records and its own temporaries). Anything else in the folder is refused by name, and
`overwrite=True` is the explicit way out: the stage then writes its own files over whatever has
their names and leaves every other file alone. A file or folder at one of the stage's entry names
(checkpoint/, metrics.jsonl) that it did not write is refused even then (it would have to be
deleted). A stage deletes only what it owns, by plain names inside its folder: files of an
earlier run that the finished manifest no longer lists, entries of a run of another identity,
scratch entries once complete, temporaries of killed writes. A manifest or record naming
anything else (`../x`, an absolute path) is not ours. An output that overlaps an input (either
inside the other, or the folder of an input file) is refused up front.

A commit writes the file under a temporary name, then its record, then renames: a kill at any
moment leaves either a temporary (cleared on the next run) or a named file of ours whose record
does not validate yet (redone), never a file that nothing names.

The record functions are plain module functions of (folder, name), so Ray workers commit shards
themselves while the driver holds the lock.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import (
    MANIFEST,
    ArtifactError,
    exclusive_output,
    is_plain_name,
    is_temporary,
    listed_entries,
    read_manifest,
    refuse_names_outside,
    remove_stale_temporaries,
    shard_is_valid,
    verify_listed_shard,
    write_file_atomic,
    write_json_atomic,
    write_manifest,
    write_parquet,
)
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.schemas import SchemaError

PROGRESS = "_progress"
LOCK = ".lock"


# -- records: usable from any process ------------------------------------------------------------


def record_path(folder: Path, name: str) -> Path:
    return Path(folder) / PROGRESS / f"{name}.json"


def read_record(folder: Path, name: str) -> dict[str, Any] | None:
    """The progress record of `name`, or None when absent or unreadable (then the file is redone)."""
    try:
        record = json.loads(record_path(folder, name).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def completed_record(folder: Path, name: str, run_key: str) -> dict[str, Any] | None:
    """The record of `name` when it was committed under `run_key` and the file still matches it:
    same sha256, readable Parquet with the recorded row count. None means "do it (again)"."""
    record = read_record(folder, name)
    if record is None or record.get("run_key") != run_key or None in (record.get("sha256"), record.get("rows")):
        return None
    return record if shard_is_valid(Path(folder) / name, record["sha256"], record["rows"]) else None


def commit_file(
    folder: Path, name: str, write: Callable[[Path], None], rows: int, record: dict[str, Any]
) -> dict[str, Any]:
    """Make `folder/name` atomically with `write(temporary)` (a file of `rows` rows) and its record (which
    should carry a `run_key`); the record gains file, sha256 and rows and is written before the rename."""
    folder = Path(folder)
    complete: dict[str, Any] = {}

    def write_record(digest: str) -> None:
        complete.update(record | {"file": name, "sha256": digest, "rows": rows})
        write_json_atomic(complete, record_path(folder, name))

    write_file_atomic(write, folder / name, before_rename=write_record)
    return complete


def commit_shard(folder: Path, name: str, table: pa.Table, record: dict[str, Any]) -> dict[str, Any]:
    """Write `table` as the Parquet shard `folder/name` atomically with its record; see `commit_file`."""
    return commit_file(folder, name, lambda temporary: write_parquet(table, temporary), table.num_rows, record)


# -- the output folder: held by one driver ---------------------------------------------------------


def refuse_overlap(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output that overlaps an input, both ways: the output equal to or inside an input folder, or
    the folder of an input file; or an input (a corpus, a model folder) inside the output, which a rerun or
    --overwrite could replace before reading it."""
    resolved = Path(output).resolve()
    for given in inputs:
        source = Path(given).resolve()
        if source.is_dir() and (resolved == source or source in resolved.parents):
            where = "the" if resolved == source else "inside the"
            problem = f"output {output} is {where} input folder {source}"
        elif not source.is_dir() and resolved in (source, source.parent):
            problem = f"output folder {output} is the folder of the input file {source}"
        elif resolved in source.parents:
            problem = f"the input {given} is inside the output folder {output}"
        else:
            continue
        raise ArtifactError(f"{problem}; choose an output folder outside the inputs, with no input inside it")


@dataclass
class _Previous:
    """What an earlier run left in the folder."""

    manifest: dict[str, Any] | None = None  # a readable manifest of this stage's kind
    problem: str | None = None  # why the manifest there cannot be ours (another kind, unreadable, names outside)


# Names in the folder that are the protocol's own, never a stage's file.
_RESERVED = {MANIFEST, LOCK, PROGRESS}


class StageOutput:
    """One stage's exclusive, exactly-once output folder; `run_stage` uses it as a context manager.

    identity: what the output is made from (inputs, settings, checkpoints); a finished output with
    another identity is replaced only with `overwrite`. inputs: folders or files the stage reads.
    entries: fixed names of files or folders the stage writes besides shards (a checkpoint folder,
    a metrics log): claimed by `begin` (a record names them before they exist; what a run of another
    identity left in them goes), never removed by `finish`; the stage manages their contents.
    scratch: entries `finish` removes once the output is complete (resumable state).
    """

    def __init__(
        self,
        folder: Path,
        kind: str,
        *,
        identity: dict[str, Any] | None = None,
        overwrite: bool = False,
        inputs: Sequence[Path] = (),
        entries: Sequence[str] = (),
        scratch: Sequence[str] = (),
    ):
        self.folder = Path(folder)
        self.entries = (*entries, *(name for name in scratch if name not in entries))
        self.scratch = tuple(scratch)
        self.kind = kind
        self.identity = sha256_json(identity) if identity is not None else None
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.previous = _Previous()
        self._held = ExitStack()

    # context: look, lock, look again (nothing is removed or written until `begin`)

    def __enter__(self) -> StageOutput:
        refuse_overlap(self.folder, self.inputs)
        if self.folder.exists() and not self.folder.is_dir():
            raise ArtifactError(f"output {self.folder} is a file; pass a folder (new or empty)")
        if self.folder.is_dir():
            self._inspect()  # a refusal leaves the folder as it was: not even a lock file
        with ExitStack() as held:
            held.enter_context(exclusive_output(self.folder))
            self._inspect()  # again, now that no other writer can change it
            self._held = held.pop_all()  # keep the lock past a successful inspection
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _inspect(self) -> None:
        """Read what an earlier run left; refuse a foreign artifact, another identity or files not ours."""
        self.previous = self._read_previous()
        if self.overwrite:
            self._refuse_foreign_entries()
            return
        if self.previous.problem is not None:
            raise ArtifactError(f"{self.previous.problem}; choose another output folder or pass --overwrite")
        manifest = self.previous.manifest
        if manifest is not None and self.identity is not None and manifest.get("run_identity") != self.identity:
            raise ArtifactError(
                f"{self.folder} already holds a {self.kind} artifact made from other inputs or settings; "
                "pass --overwrite to replace it or choose another --output"
            )
        foreign = self.foreign_files()
        if foreign:
            more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
            raise ArtifactError(
                f"{self.folder} holds files this stage did not write: {', '.join(foreign[:3])}{more}; "
                "choose an empty or new output folder, or pass --overwrite to write over them "
                "(files with other names are left as they are)"
            )

    def _refuse_foreign_entries(self) -> None:
        """With --overwrite too, an entry name (checkpoint/, metrics.jsonl) this stage did not write is refused:
        entries are not written over in one rename (a folder, a log appended to), so ours would have to delete
        someone else's first. (Without --overwrite `foreign_files` names them.)"""
        for name in self.entries:
            path = self.folder / name
            if (path.exists() or path.is_symlink()) and read_record(self.folder, name) is None:
                raise ArtifactError(
                    f"{path} exists and was not written by sstoken {self.kind}; move it away or choose another --output"
                )

    def _read_previous(self) -> _Previous:
        if not (self.folder / MANIFEST).exists():
            return _Previous()
        try:
            manifest = read_manifest(self.folder)
        except (ArtifactError, SchemaError) as error:
            return _Previous(problem=str(error))
        if manifest["kind"] != self.kind:
            return _Previous(problem=f"{self.folder} holds a '{manifest['kind']}' artifact, not {self.kind}")
        return _Previous(manifest=manifest)

    def owned_files(self) -> set[str]:
        """Names of the files this stage wrote here: named by its manifest or its progress records (plain
        names inside the folder only; the protocol's own names are never a stage's file)."""
        names = {p.name.removesuffix(".json") for p in (self.folder / PROGRESS).glob("*.json")}
        if self.previous.manifest is not None:
            names |= {entry["file"] for entry in listed_entries(self.previous.manifest)}
        return {name for name in names if is_plain_name(name)} - _RESERVED

    def foreign_files(self) -> list[str]:
        """Entries of the folder this stage did not write, sorted."""
        ours = self.owned_files() | _RESERVED
        if self.previous.problem is not None:
            ours.discard(MANIFEST)
        return sorted(p.name for p in self.folder.iterdir() if p.name not in ours and not is_temporary(p.name))

    def up_to_date(self) -> dict[str, Any] | None:
        """The existing manifest when the folder already holds this exact, complete and valid output."""
        manifest = self.previous.manifest
        if manifest is None or self.identity is None or manifest.get("run_identity") != self.identity:
            return None
        try:
            for entry in listed_entries(manifest):
                verify_listed_shard(self.folder, entry)
        except ArtifactError:
            return None
        return manifest

    # the protocol (called by `run_stage` only)

    def begin(self) -> None:
        """The run starts writing: the manifest goes (the folder reads as incomplete until `finish`),
        temporaries of killed writes go, and the entries are claimed."""
        (self.folder / PROGRESS).mkdir(exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        remove_stale_temporaries(self.folder)
        remove_stale_temporaries(self.folder / PROGRESS)
        for name in self.entries:
            self._claim(name)

    def _claim(self, name: str) -> None:
        """Own entry `name` for this run; what a run with another identity left in it goes (ours by its record)."""
        record = read_record(self.folder, name)
        if record is not None and record.get("run_identity") == self.identity:
            return
        if record is not None:
            self._remove(name)
        self.record_entry(name, {})

    def _remove(self, name: str) -> None:
        """Delete our file or folder `name` (a plain name inside the folder) and its record."""
        if not is_plain_name(name) or name in _RESERVED:
            raise ArtifactError(f"refusing to delete {name!r}: not a file name inside {self.folder}; this is a bug, please report it")
        path = self.folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        record_path(self.folder, name).unlink(missing_ok=True)

    def finish(self, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
        """Check every listed file against its record, delete our files the manifest no longer lists and the
        scratch entries, then write the manifest (validated, with the run identity), last. Returns what was
        written. A stage whose record is its own (the run's run.json) passes None: no manifest is written."""
        listed: set[str] = set()
        if manifest is not None:
            if self.identity is not None:
                manifest = manifest | {"run_identity": self.identity}
            refuse_names_outside(manifest, self.folder / MANIFEST)
            for entry in listed_entries(manifest):
                record = read_record(self.folder, entry["file"])
                if record is None or (record.get("sha256"), record.get("rows")) != (entry["sha256"], entry["rows"]):
                    raise ArtifactError(
                        f"{self.folder / entry['file']} does not match its progress record; this is a bug, please report it"
                    )
                listed.add(entry["file"])
        for name in sorted(self.owned_files() - listed - set(self.entries)):
            self._remove(name)  # our own files of an earlier run that this run's manifest does not list
        for name in self.scratch:
            self._remove(name)
        remove_stale_temporaries(self.folder)
        remove_stale_temporaries(self.folder / PROGRESS)
        if manifest is not None:
            write_manifest(self.folder, manifest)
        return manifest

    # what a stage's work calls

    def done(self, name: str, run_key: str) -> dict[str, Any] | None:
        """The record of `name` when it is already committed under `run_key` and still valid."""
        return completed_record(self.folder, name, run_key)

    def commit(self, name: str, table: pa.Table, record: dict[str, Any]) -> dict[str, Any]:
        """Write one Parquet file atomically with its record; see `commit_shard`."""
        return commit_shard(self.folder, name, table, record)

    def commit_file(self, name: str, write: Callable[[Path], None], rows: int, record: dict[str, Any]) -> dict[str, Any]:
        """Write one data file atomically with its record; see `commit_file`."""
        return commit_file(self.folder, name, write, rows, record)

    def record_entry(self, name: str, record: dict[str, Any]) -> None:
        """Record what the entry `name` (one of `entries`) holds now, e.g. its sha256 and rows; the record
        always carries this run's identity, so a rerun of the same run keeps the entry."""
        if name not in self.entries:
            raise ValueError(f"{name} is not one of this output's entries {self.entries}")
        write_json_atomic({"file": name} | record | {"run_identity": self.identity}, record_path(self.folder, name))

    def installed(self, name: str, fingerprint_of: Callable[[Path], str]) -> str | None:
        """The fingerprint of the entry folder `name` when this run (same identity) already installed it and
        it still has the fingerprint its record names; None means "make it (again)"."""
        record = read_record(self.folder, name) or {}
        if record.get("run_identity") != self.identity or "fingerprint" not in record:
            return None
        try:
            found = fingerprint_of(self.folder / name)
        except UserError:
            return None
        return found if found == record["fingerprint"] else None

    def install(self, name: str, source: Path, fingerprint: str) -> None:
        """Rename the complete folder `source` to the entry `name`: its record (with the fingerprint) first,
        then whatever an earlier, incomplete attempt of this run left there goes (ours by its record)."""
        self.record_entry(name, {"fingerprint": fingerprint})
        target = self.folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(source, target)


# -- the summary ---------------------------------------------------------------------------------


@dataclass
class StageSummary:
    """What one stage run did: the one type every stage returns and the CLI prints.

    counts: named figures in print order (rows, shards, tokens, ...); timings: seconds per phase;
    notes: lines the user should read (an input that gave no row, fewer actors than asked for);
    details: stage-specific nested figures (rejections by reason, per-phase figures);
    reused: the output was already complete and nothing ran.
    """

    stage: str
    output: Path
    counts: dict[str, int | float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    reused: bool = False

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form (for logs, `--json` output and run records)."""
        return {
            "stage": self.stage,
            "output": str(self.output),
            "counts": dict(self.counts),
            "timings": dict(self.timings),
            "notes": list(self.notes),
            "details": json.loads(json.dumps(self.details, default=str)),
            "reused": self.reused,
        }

