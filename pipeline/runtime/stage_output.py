"""The one exactly-once output of every stage that writes shards, and the one summary every stage returns.

    with StageOutput(folder, "scores", identity=run_identity, overwrite=False, inputs=[data]) as out:
        out.begin()                                   # the run starts: the manifest goes
        for name in shard_names:
            if out.done(name, key) is None:           # skip-if-done
                out.commit(name, table, {"run_key": key})
        out.finish(manifest)                          # written last: its presence means complete

The folder: `part-*.parquet` shards (and other files a stage commits), one `_progress/<file>.json`
record per committed file (its run key, sha256 and row count), `manifest.json`, and `.lock`.

Ownership: a stage owns only the files its own manifest or progress records name (plus the lock,
the records and its own temporaries). Anything else in the folder is refused by name, and
`overwrite=True` is the explicit way out: the stage then writes its own files over whatever has
their names and leaves every other file alone. A stage deletes only files it owns: shards of an
earlier run that the finished manifest no longer lists, and temporaries of killed writes. An
output folder equal to or inside an input folder is refused up front.

A commit writes the file under a temporary name, then its record, then renames: a kill at any
moment leaves either a temporary (cleared on the next run) or a named file of ours whose record
does not validate yet (redone), never a file that nothing names.

The record functions are plain module functions of (folder, name), so Ray workers commit shards
themselves while the driver holds the lock.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from pipeline.runtime.files import (
    MANIFEST,
    ArtifactError,
    exclusive_output,
    is_temporary,
    read_manifest,
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


def _refuse_output_in_inputs(output: Path, inputs: Sequence[Path]) -> None:
    """Refuse an output folder equal to or inside an input folder, or the folder of an input file."""
    resolved = output.resolve()
    for source in map(lambda p: Path(p).resolve(), inputs):
        if source.is_dir() and (resolved == source or source in resolved.parents):
            where = "the" if resolved == source else "inside the"
            problem = f"output folder {output} is {where} input folder {source}"
        elif not source.is_dir() and resolved in (source, source.parent):
            problem = f"output folder {output} is the folder of the input file {source}"
        else:
            continue
        raise ArtifactError(f"{problem}; choose an output folder outside the inputs")


def listed_entries(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every file entry a manifest lists: its shards and single files such as `rejected`."""
    singles = [v for v in manifest.values() if isinstance(v, dict) and {"file", "sha256", "rows"} <= set(v)]
    return [*manifest["shards"], *singles]


@dataclass
class _Previous:
    """What an earlier run left in the folder."""

    manifest: dict[str, Any] | None = None  # a readable manifest of this stage's kind
    problem: str | None = None  # why the manifest there cannot be ours (another kind, unreadable)


class StageOutput:
    """One stage's exclusive, exactly-once output folder; use as a context manager (see the module doc).

    identity: what the output is made from (inputs, settings, checkpoints); a finished output with
    another identity is replaced only with `overwrite`. inputs: folders or files the stage reads.
    entries: fixed names of files or folders the stage writes besides shards (a checkpoint folder,
    a metrics log): owned once `claim`ed (a record names them before they exist), never removed by
    `finish`; the stage manages their contents itself.
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
    ):
        self.folder = Path(folder)
        self.entries = tuple(entries)
        self.kind = kind
        self.identity = sha256_json(identity) if identity is not None else None
        self.overwrite = overwrite
        self.inputs = list(inputs)
        self.previous = _Previous()
        self._held = ExitStack()

    # context: lock, then look (nothing is removed or written until `begin`)

    def __enter__(self) -> StageOutput:
        _refuse_output_in_inputs(self.folder, self.inputs)
        with ExitStack() as held:
            held.enter_context(exclusive_output(self.folder))
            self._inspect()
            self._held = held.pop_all()  # keep the lock past a successful inspection
        return self

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _inspect(self) -> None:
        """Read what an earlier run left; refuse a foreign artifact, another identity or files not ours."""
        self.previous = self._read_previous()
        if self.overwrite:
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
        """Names of the files this stage wrote here: named by its manifest or its progress records."""
        names = {p.name.removesuffix(".json") for p in (self.folder / PROGRESS).glob("*.json")}
        if self.previous.manifest is not None:
            names |= {entry["file"] for entry in listed_entries(self.previous.manifest)}
        return names

    def foreign_files(self) -> list[str]:
        """Entries of the folder this stage did not write, sorted."""
        ours = self.owned_files() | {MANIFEST, LOCK, PROGRESS}
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

    # the run

    def begin(self) -> None:
        """The run starts writing: the manifest goes (the folder reads as incomplete until `finish`),
        temporaries of killed writes go."""
        (self.folder / PROGRESS).mkdir(exist_ok=True)
        (self.folder / MANIFEST).unlink(missing_ok=True)
        remove_stale_temporaries(self.folder)
        remove_stale_temporaries(self.folder / PROGRESS)

    def done(self, name: str, run_key: str) -> dict[str, Any] | None:
        """The record of `name` when it is already committed under `run_key` and still valid."""
        return completed_record(self.folder, name, run_key)

    def claim(self, name: str, record: dict[str, Any] | None = None) -> None:
        """Record that this stage owns the entry `name` (one of `entries`) before writing it."""
        if name not in self.entries:
            raise ValueError(f"{name} is not one of this output's entries {self.entries}")
        write_json_atomic({"file": name} | (record or {}), record_path(self.folder, name))

    def commit(self, name: str, table: pa.Table, record: dict[str, Any]) -> dict[str, Any]:
        """Write one file atomically with its record; see `commit_shard`."""
        return commit_shard(self.folder, name, table, record)

    def finish(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Check every listed file against its record, delete our files the manifest no longer lists,
        then write the manifest (validated, with the run identity), last. Returns what was written."""
        if self.identity is not None:
            manifest = manifest | {"run_identity": self.identity}
        entries = listed_entries(manifest)
        for entry in entries:
            record = read_record(self.folder, entry["file"])
            if record is None or (record.get("sha256"), record.get("rows")) != (entry["sha256"], entry["rows"]):
                raise ArtifactError(
                    f"{self.folder / entry['file']} does not match its progress record; this is a bug, please report it"
                )
        self._remove_unlisted({entry["file"] for entry in entries})
        remove_stale_temporaries(self.folder)
        remove_stale_temporaries(self.folder / PROGRESS)
        write_manifest(self.folder, manifest)
        return manifest

    def _remove_unlisted(self, listed: set[str]) -> None:
        """Our own files of an earlier run (with their records) that this run's manifest does not list."""
        for name in sorted(self.owned_files() - listed - set(self.entries)):
            (self.folder / name).unlink(missing_ok=True)
            record_path(self.folder, name).unlink(missing_ok=True)


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

