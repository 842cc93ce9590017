"""Keep masks for a trainer, read alike from either folder that holds them.

    source, masks = read_keep_masks(folder)      # masks: sample_id, keep (list<bool>), weight (list<float32>)

`folder` is a scores folder (`sstoken score`, or `sstoken select` in place: the masks sit beside
the signals) or a masks folder (`sstoken select --output`: the masks apart). Either way `source`
says what the masks were made from, so a trainer can refuse masks of other data or another
tokenizer before it pairs a single token: `source.tokenized_fingerprint` is the `data_fingerprint`
of the tokenized folder that was scored, `source.tokenizer_fingerprint` its tokenizer's.

Every reader gets a per-token `weight` beside `keep` (the loss is sum(w_i * nll_i) / sum(w_i)): the
shard's own `weight` column (masks.v1, optional) where it has one, else `keep` as float32
(`pipeline.runtime.mask_weights`). So masks written before the column existed, and scores folders
(scores.v1 has no weight column: every selection stored in place is binary), read as weight 1 on
every kept token.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.files import MANIFEST, ArtifactError, read_manifest, verify_listed_shard
from pipeline.runtime.mask_weights import MASK_COLUMNS, WEIGHT, stored_mask_columns, with_weight
from pipeline.runtime.schemas import arrow_schema

# Artifact kinds whose shards carry a `keep` column; their table schema has the kind's name.
KEEP_MASK_KINDS = ("scores", "masks")


@dataclass(frozen=True)
class KeepMasksSource:
    """Where a folder's keep masks come from, as its manifest records it."""

    folder: Path
    kind: str  # "scores" or "masks"
    tokenized_fingerprint: str  # data_fingerprint of the tokenized folder the masks were made from
    tokenized_path: Path
    tokenizer_fingerprint: str
    chat_template_fingerprint: str
    checkpoints: dict[str, Any]  # current and history: path and fingerprint
    selection: dict[str, Any]  # method and settings, excess direction, warnings (round 0: attention only)
    manifest: dict[str, Any]


def _tokenized_input(manifest: dict[str, Any], folder: Path) -> dict[str, Any]:
    entries = [entry for entry in manifest.get("inputs", []) if entry.get("kind") == "tokenized"]
    if not entries or "data_fingerprint" not in entries[0] or "path" not in entries[0] or "tokenizer" not in manifest:
        raise ArtifactError(
            f"{Path(folder) / MANIFEST} does not say which tokenized data and tokenizer its masks were made from; "
            "rerun the stage that made it (`sstoken score`, or `sstoken select --output`)"
        )
    return entries[0]


def keep_masks_source(folder: Path) -> KeepMasksSource:
    """The provenance of a scores or masks folder's keep masks; refuses any other folder by name."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest["kind"] not in KEEP_MASK_KINDS:
        raise ArtifactError(
            f"{folder} holds a '{manifest['kind']}' artifact, not keep masks: pass a scores folder (`sstoken score`) "
            "or a masks folder (`sstoken select --output`)"
        )
    tokenized = _tokenized_input(manifest, folder)
    return KeepMasksSource(
        folder=folder,
        kind=manifest["kind"],
        tokenized_fingerprint=tokenized["data_fingerprint"],
        tokenized_path=Path(tokenized["path"]),
        tokenizer_fingerprint=manifest["tokenizer"]["fingerprint"],
        chat_template_fingerprint=manifest["tokenizer"]["chat_template_fingerprint"],
        checkpoints=manifest.get("checkpoints", {}),
        selection=manifest.get("selection", {}),
        manifest=manifest,
    )


def read_keep_mask_shard(source: KeepMasksSource, entry: dict[str, Any]) -> pa.Table:
    """One listed shard's sample_id, keep and weight columns, after checking the file against its manifest entry."""
    verify_listed_shard(source.folder, entry)
    path = source.folder / entry["file"]
    try:
        table = pq.read_table(path, columns=stored_mask_columns(path))
    except (pa.ArrowException, OSError) as error:
        raise ArtifactError(f"{path} has no readable sample_id and keep columns: {error}") from error
    expected = _mask_schema(source.kind).field
    for name in table.column_names:
        if table.schema.field(name).type != expected(name).type or table.column(name).null_count:
            raise ArtifactError(
                f"{path}: column '{name}' is {table.schema.field(name).type} with {table.column(name).null_count} "
                f"nulls, {source.kind}.v1 requires {expected(name).type} without nulls; rerun the stage that made it"
            )
    return with_weight(table)


def _mask_schema(kind: str) -> pa.Schema:
    """sample_id, keep (the kind's types) and weight: what `read_keep_mask_shard` returns."""
    return pa.schema([*(arrow_schema(kind).field(name) for name in MASK_COLUMNS), arrow_schema("masks").field(WEIGHT)])


def read_keep_masks(folder: Path) -> tuple[KeepMasksSource, pa.Table]:
    """(provenance, every listed shard's sample_id, keep and weight in manifest order) of a scores or masks folder."""
    source = keep_masks_source(folder)
    tables = [read_keep_mask_shard(source, entry) for entry in source.manifest["shards"]]
    schema = _mask_schema(source.kind)
    table = pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()
    return source, table
