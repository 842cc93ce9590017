"""Check an artifact folder against its schema and manifest, and the contracts every stage keeps.

    report = validate_folder(folder)     # one FolderReport: a Finding per check, problems named
    folders = find_artifacts(root)       # a run folder (or any tree): every artifact folder in it

Checks, by name (each reports every problem it finds, not only the first):
- manifest: manifest.json is readable and matches manifest.v1.schema.json;
- files: every file it lists exists with its checksum and row count;
- fingerprint: its data_fingerprint is the digest of the shards it lists;
- schema: every shard has its schema's columns and types (`schemas/KIND.v1.json`);
- counts: the manifest's counts are the shards' (rows, tokens, trainable, kept, labels) and add up
  (rows read = written + rejected; samples in = exported + skipped);
- alignment: the contract row by row (`pipeline.runtime.alignment`): lengths equal, position 0 never a target,
  keep only where trainable, NaN exactly off the targets, per-row counts; exports' labels;
- unique ids: no sample id twice;
- join: scores and masks join the tokenized data they name (same tokenizer, same data, every id on
  both sides, same lengths); exports, train outputs and a run's slices: their inputs still hold what
  they were made from, an export's labels are its masks', a train output's checkpoint is the one it names.

A history cache folder (no manifest: files named as the tokenized shards) gets schema, unique ids
and position 0. The functions raise nothing for a bad artifact: every problem becomes a finding.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import polars as pl
import pyarrow.compute as pc

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import MANIFEST, read_data_file, read_manifest, refuse_repeated_sample_ids, verify_listed_shard
from pipeline.runtime.mask_weights import read_mask_columns
from pipeline.runtime.schemas import arrow_schema, optional_columns, validate_table
from pipeline.runtime.stage_output import PROGRESS, listed_entries
from pipeline.training.training_data import join_samples, open_training_data, shards_key
from pipeline.runtime.alignment import IGNORE_INDEX, alignment_problems, example, flat_lists, rows_where

COUNTED = {
    "rows_written": "rows", "samples": "rows", "exported": "rows",
    "tokens": "n_tokens", "trainable_tokens": "n_trainable", "trainable": "n_trainable", "kept": "n_kept", "labels": "n_kept",
}
HISTORY_CACHE = "history_nll"
SKIP_DIRS = {PROGRESS, "checkpoint", ".git"}


@dataclass(frozen=True)
class Finding:
    check: str
    problems: tuple[str, ...]
    detail: str = ""  # what was checked, when it passed; why it was skipped

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class FolderReport:
    folder: Path
    kind: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"{f.check}: {p}" for f in self.findings for p in f.problems]


@dataclass
class _Shard:
    file: str
    table: pa.Table


# -- folder-level checks ---------------------------------------------------------------------------


def _check(report: FolderReport, name: str, run: Callable[[], list[str] | str]) -> None:
    """Run one check; a list is its problems, a string what it checked (passed); a UserError is a problem."""
    try:
        outcome = run()
    except UserError as error:
        outcome = [str(error)]
    if isinstance(outcome, str):
        report.findings.append(Finding(name, (), outcome))
    else:
        report.findings.append(Finding(name, tuple(outcome)))


def _files(folder: Path, manifest: dict[str, Any]) -> list[str] | str:
    problems = []
    for entry in listed_entries(manifest):
        try:
            verify_listed_shard(folder, entry)
        except UserError as error:
            problems.append(str(error))
    return problems or f"{len(listed_entries(manifest))} files: checksums and row counts as listed"


def _datasets_state(folder: Path, manifest: dict[str, Any]) -> list[str] | str:
    """An hf export: datasets' state.json names exactly the Arrow files the manifest lists."""
    try:
        state = json.loads((folder / "state.json").read_text())
        named = [entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [f"{folder / 'state.json'} is missing or not a datasets state file ({error}); datasets.load_from_disk "
                "cannot open the folder: export it again"]
    listed = [entry["file"] for entry in manifest["shards"]]
    if named != listed:
        return [f"{folder / 'state.json'} names {named}, the manifest lists {listed}: export it again"]
    return "state.json names the listed Arrow files"


def _fingerprint(manifest: dict[str, Any]) -> list[str] | str:
    if "data_fingerprint" not in manifest:
        return "no data_fingerprint recorded"
    if manifest["data_fingerprint"] != shards_key(manifest):
        return [f"data_fingerprint {manifest['data_fingerprint'][:12]} is not the digest of the listed shards "
                f"({shards_key(manifest)[:12]}); the manifest was edited"]
    return "data_fingerprint is the digest of the listed shards"


def _read_shards(folder: Path, manifest: dict[str, Any]) -> tuple[list[_Shard], list[str]]:
    shards, problems = [], []
    for entry in manifest["shards"]:
        try:
            shards.append(_Shard(entry["file"], read_data_file(folder / entry["file"])))
        except UserError as error:
            problems.append(str(error))
    return shards, problems


def _schema(kind: str, shards: list[_Shard]) -> list[str] | str:
    problems = []
    for shard in shards:
        try:
            table = shard.table
            if shard.file.endswith(".jsonl"):  # JSON has no int widths: the values must fit the schema's
                schema = arrow_schema(kind)
                present = [f for f in schema if f.name in table.column_names or f.name not in optional_columns(kind)]
                table = table.select([f.name for f in present]).cast(pa.schema(present, metadata=schema.metadata))
            validate_table(table, kind, source=shard.file)
        except (UserError, pa.ArrowException, KeyError) as error:
            problems.append(f"{shard.file}: {error}")
    return problems or f"{len(shards)} file{'s' if len(shards) != 1 else ''} match{'es' if len(shards) == 1 else ''} {kind}.v1"


def _counts(manifest: dict[str, Any], shards: list[_Shard]) -> list[str] | str:
    counts, problems = manifest["counts"], []
    for name, what in COUNTED.items():
        if name not in counts or (what != "rows" and not all(what in s.table.column_names for s in shards)):
            continue
        found = sum(s.table.num_rows if what == "rows" else int(pc.sum(s.table.column(what)).as_py() or 0) for s in shards)
        if counts[name] != found:
            problems.append(f"the manifest counts {name} = {counts[name]}, the shards hold {found}")
    rejected = manifest.get("rejected")
    if isinstance(rejected, dict) and "rows_rejected" in counts and rejected.get("rows") != counts["rows_rejected"]:
        problems.append(f"the manifest counts rows_rejected = {counts['rows_rejected']}, {rejected.get('file')} holds "
                        f"{rejected.get('rows')}")
    for total, parts in (("rows_read", ("rows_written", "rows_rejected")), ("samples_in", ("exported", "skipped_without_kept"))):
        if all(k in counts for k in (total, *parts)) and counts[total] != sum(counts[k] for k in parts):
            problems.append(f"{total} = {counts[total]} is not {' + '.join(parts)} = {sum(counts[k] for k in parts)}")
    return problems or "manifest counts match the shards"


def _unique_ids(folder: Path, manifest: dict[str, Any]) -> list[str] | str:
    refuse_repeated_sample_ids(folder, manifest)
    return "every sample id once"


def _column_by_id(folder: Path, manifest: dict[str, Any], column: str) -> pl.DataFrame:
    """sample_id and one per-token column of every shard a manifest lists."""
    return pl.concat([pl.from_arrow(read_data_file(folder / s["file"], ["sample_id", column])) for s in manifest["shards"]])


def _trainable_by_id(tokenized: Path, manifest: dict[str, Any]) -> pl.DataFrame:
    """sample_id, trainable of a tokenized folder."""
    return _column_by_id(tokenized, manifest, "trainable")


def _aligned(shard: _Shard, by_id: pl.DataFrame, column: str) -> pa.ChunkedArray | None:
    """`column` of `by_id` in the shard's row order; None when a sample of the shard has no row there."""
    ids = pl.DataFrame({"sample_id": shard.table.column("sample_id").to_pylist()}, schema={"sample_id": pl.String})
    joined = ids.join(by_id.unique("sample_id", keep="first"), on="sample_id", how="left", maintain_order="left")
    if joined[column].null_count():
        return None
    return joined[column].to_arrow()


def _targets_of(shard: _Shard, trainable: pl.DataFrame | None) -> pa.ChunkedArray | None:
    return None if trainable is None else _aligned(shard, trainable, "trainable")


def _tokenized_input(manifest: dict[str, Any]) -> Path | None:
    entries = [i for i in manifest.get("inputs", []) if i.get("kind") == "tokenized" and "path" in i]
    return Path(entries[0]["path"]) if entries else None


def _join(folder: Path, manifest: dict[str, Any]) -> list[str] | str:
    tokenized = _tokenized_input(manifest)
    if tokenized is None:
        return [f"{folder / MANIFEST} names no tokenized input"]
    source = open_training_data(tokenized, folder)
    joined = join_samples(source, check_keep=False)  # keep is the alignment check's, which names more
    return f"joins {tokenized} by sample id ({len(joined)} samples, same tokenizer and data, same lengths)"


def _inputs_unchanged(manifest: dict[str, Any]) -> list[str] | str:
    """Each recorded input that still exists holds the data (shards) it was made from."""
    problems, checked = [], []
    for entry in manifest.get("inputs", []):
        path = Path(entry.get("path", ""))
        if "data_fingerprint" not in entry or not (path / MANIFEST).is_file():
            continue
        found = shards_key(read_manifest(path))
        if found != entry["data_fingerprint"]:
            problems.append(f"input {path} ({entry.get('kind')}) no longer holds the data this was made from "
                            f"(data fingerprint {found[:12]}, recorded {entry['data_fingerprint'][:12]})")
        checked.append(str(path))
    return problems or (f"inputs unchanged: {', '.join(checked)}" if checked else "skipped: no recorded input exists here")


def _export_labels_match_masks(folder: Path, manifest: dict[str, Any], shards: list[_Shard]) -> list[str] | str:
    """Every row's labels are where its masks keep (position 0 aside), when the masks it names are here."""
    paths = {i.get("kind"): Path(i["path"]) for i in manifest.get("inputs", []) if "path" in i}
    masks_path = paths.get("scores", paths.get("masks"))
    if paths.get("tokenized") is None or masks_path is None or not (masks_path / MANIFEST).is_file():
        return "skipped: the masks it was made from are not here"
    source = open_training_data(paths["tokenized"], masks_path)
    masks_by_id = _masks_by_id(masks_path, source.masks_manifest)
    differ = _labels_differ(shards, masks_by_id)
    if differ:
        return [f"labels are not the keep masks of {masks_path} in {example(differ, len(differ), str(folder))}"]
    weights = [s for s in shards if "weights" in s.table.column_names]
    differ = _weights_differ(weights, masks_by_id)
    if differ:
        return [f"weights are not the weights of {masks_path} at the labels in {example(differ, len(differ), str(folder))}"]
    return f"labels are the keep masks of {masks_path}" + (", weights their weights" if weights else "")


def _masks_by_id(folder: Path, manifest: dict[str, Any]) -> pl.DataFrame:
    """sample_id, keep and weight (keep as 0/1 where the shards store none) of every shard a manifest lists."""
    return pl.concat([pl.from_arrow(read_mask_columns(folder / s["file"])) for s in manifest["shards"]])


def _aligned_flat(shard: _Shard, by_id: pl.DataFrame, column: str, like: str) -> np.ndarray | None:
    """`column` of `by_id` in the shard's row order, flat; None when a sample has no row there or another length
    than the shard's list column `like`."""
    values = _aligned(shard, by_id, column)
    if values is None or not np.array_equal(pc.list_value_length(values).to_numpy(zero_copy_only=False),
                                            pc.list_value_length(shard.table.column(like)).to_numpy(zero_copy_only=False)):
        return None
    return flat_lists(pa.table({column: values}), column)[0]


def _weights_differ(shards: list[_Shard], masks_by_id: pl.DataFrame) -> list[str]:
    """Sample ids whose exported weights are not the masks' weights at their labels (0 elsewhere)."""
    differ: list[str] = []
    for shard in shards:
        weight = _aligned_flat(shard, masks_by_id, "weight", "weights")
        if weight is None:
            differ += shard.table.column("sample_id").to_pylist()
            continue
        exported, offsets = flat_lists(shard.table, "weights")
        labels, _ = flat_lists(shard.table, "labels")
        expected = np.where(labels != IGNORE_INDEX, weight, 0).astype(np.float32)
        differ += rows_where(shard.table, offsets, exported.astype(np.float32) != expected)
    return differ


def _labels_differ(shards: list[_Shard], masks_by_id: pl.DataFrame) -> list[str]:
    """Sample ids whose labels are not where their keep masks keep (position 0 aside)."""
    differ: list[str] = []
    for shard in shards:
        keep = _aligned_flat(shard, masks_by_id, "keep", "labels")
        if keep is None:
            differ += shard.table.column("sample_id").to_pylist()
            continue
        labels, offsets = flat_lists(shard.table, "labels")
        expected = keep.astype(bool)
        expected[offsets[:-1][offsets[:-1] < offsets[1:]]] = False  # position 0 is never a label
        differ += rows_where(shard.table, offsets, (labels != IGNORE_INDEX) != expected)
    return differ


def _train_checkpoint(folder: Path, manifest: dict[str, Any]) -> list[str] | str:
    from pipeline.runtime.checkpoints import checkpoint_fingerprint

    final = manifest.get("checkpoints", {}).get("final")
    if final is None:
        return [f"{folder / MANIFEST} names no final checkpoint"]
    found = checkpoint_fingerprint(folder / "checkpoint")
    if found != final["fingerprint"]:
        return [f"{folder / 'checkpoint'} is not the checkpoint the manifest names (fingerprint {found[:12]}, "
                f"recorded {final['fingerprint'][:12]}); it changed after training"]
    return "checkpoint/ is the final checkpoint the manifest names"


def _validate_manifest_folder(folder: Path) -> FolderReport:
    report = FolderReport(folder, "?")
    try:
        manifest = read_manifest(folder)
    except UserError as error:
        report.findings.append(Finding("manifest", (str(error),)))
        return report
    kind = report.kind = manifest["kind"]
    report.findings.append(Finding("manifest", (), f"kind {kind}, matches manifest.v1"))
    _check(report, "files", lambda: _files(folder, manifest))
    _check(report, "fingerprint", lambda: _fingerprint(manifest))
    if kind == "export" and manifest.get("format") == "hf":
        _check(report, "datasets", lambda: _datasets_state(folder, manifest))
    if kind == "train":
        _check(report, "join", lambda: _inputs_unchanged(manifest))
        _check(report, "checkpoint", lambda: _train_checkpoint(folder, manifest))
        return report
    shards, unreadable = _read_shards(folder, manifest)
    if unreadable:
        report.findings.append(Finding("schema", tuple(unreadable)))
        return report
    _check(report, "schema", lambda: _schema(kind, shards))
    rejected = manifest.get("rejected")
    if kind == "tokenized" and isinstance(rejected, dict) and (folder / rejected["file"]).is_file():
        _check(report, "rejected", lambda: _schema("rejected", [_Shard(rejected["file"], read_data_file(folder / rejected["file"]))]))
    if not all(f.ok for f in report.findings if f.check == "schema"):
        return report  # the checks below read the schema's columns
    _check(report, "counts", lambda: _counts(manifest, shards))
    _check(report, "unique ids", lambda: _unique_ids(folder, manifest))
    if kind == "tokenized" and _tokenized_input(manifest) is not None:
        # A run's slice or subset: the corpus it was cut from still holds the data it names.
        _check(report, "join", lambda: _inputs_unchanged(manifest))
    trainable = None
    if kind in ("scores", "masks"):
        _check(report, "join", lambda: _join(folder, manifest))
        tokenized = _tokenized_input(manifest)
        if report.findings[-1].ok and tokenized is not None:
            trainable = _trainable_by_id(tokenized, read_manifest(tokenized))
    if kind == "export":
        _check(report, "join", lambda: _inputs_unchanged(manifest))
        tokenized = _tokenized_input(manifest)
        if report.findings[-1].ok and tokenized is not None and (tokenized / MANIFEST).is_file():
            trainable = _trainable_by_id(tokenized, read_manifest(tokenized))
        _check(report, "labels", lambda: _export_labels_match_masks(folder, manifest, shards))
    _check(report, "alignment", lambda: _alignment(kind, shards, trainable))
    return report


def _alignment(kind: str, shards: list[_Shard], trainable: pl.DataFrame | None) -> list[str] | str:
    problems = [p for s in shards for p in alignment_problems(kind, s.table, s.file, _targets_of(s, trainable))]
    if problems:
        return problems
    if kind == "tokenized":
        return "lengths, position 0 never trainable, n_trainable per row"
    if kind == "export":
        where = " and only where trainable" if trainable is not None else ""
        return f"lengths, labels -100 or their token{where} (-100 at position 0), attention mask 1, n_kept per row"
    if trainable is not None:
        return "lengths, position 0, keep only where trainable, NaN exactly off the targets, counts per row"
    return "lengths, position 0 never a target (no tokenized data here to take the targets from)"


def _is_history_cache(folder: Path) -> bool:
    return HISTORY_CACHE in folder.parts and not (folder / MANIFEST).exists() and any(folder.glob("*.parquet"))


def _validate_history_cache(folder: Path) -> FolderReport:
    report = FolderReport(folder, "history_nll")
    shards, unreadable = [], []
    for path in sorted(folder.glob("*.parquet")):
        try:
            shards.append(_Shard(path.name, read_data_file(path)))
        except UserError as error:
            unreadable.append(str(error))
    if unreadable:
        report.findings.append(Finding("schema", tuple(unreadable)))
        return report
    _check(report, "schema", lambda: _schema("history_nll", shards))
    if report.findings[-1].ok:
        listing = {"shards": [{"file": s.file} for s in shards]}
        _check(report, "unique ids", lambda: _unique_ids(folder, listing))
        _check(report, "alignment", lambda: _alignment("history_nll", shards, None))
    return report


def validate_folder(folder: Path) -> FolderReport:
    """Every check of one artifact folder (a manifest folder, or a history cache folder)."""
    folder = Path(folder)
    if _is_history_cache(folder):
        return _validate_history_cache(folder)
    return _validate_manifest_folder(folder)


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    if (folder / MANIFEST).exists() or _is_history_cache(folder):
        yield folder
        return
    if depth == 0:
        return
    for child in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS and not p.name.startswith(".")):
        yield from _walk(child, depth - 1)


def find_artifacts(root: Path, depth: int = 6) -> list[Path]:
    """`root` when it is an artifact folder, else every artifact folder under it (a run folder's tokenized/,
    rounds/rNNN/scores/, masks/, train/ ...; a history cache's leaves)."""
    root = Path(root)
    if (root / MANIFEST).exists() or _is_history_cache(root):
        return [root]
    return list(_walk(root, depth))


def report_as_dict(report: FolderReport) -> dict[str, Any]:
    return {"folder": str(report.folder), "kind": report.kind,
            "checks": [{"check": f.check, "ok": f.ok, "problems": list(f.problems), "detail": f.detail} for f in report.findings]}


