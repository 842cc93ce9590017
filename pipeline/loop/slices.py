"""What a round trains on: a deterministic order of the corpus's samples, cut into contiguous slices.

    order = sample_order(ids, seed)            # every id once, in a seeded order (the same every epoch)
    parts = slice_bounds(len(order), slices)   # contiguous [start, stop) parts, sizes differ by at most 1
    materialise_slice(tokenized, order[a:b], RUN/rounds/r001/data, rows_per_shard)

A slice is written as a tokenized folder of its own (shards, manifest, provenance), exactly once
through the stage runner, so the score and train stages run on it unchanged. Its manifest records the
source corpus, which slice of which order it is, and `data_fingerprint` over its own shards (the
fingerprint the score stage records and the trainer checks the masks against).

The order is the same in every epoch (the train stage shuffles within a round): slice k of epoch
2 holds the same samples as slice k of epoch 1, so a fixed history model's cached NLLs serve both.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import base_manifest, read_manifest, read_shard, shard_name
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.stage_output import StageOutput
from pipeline.runtime.stage_runner import Stage, run_stage


def sample_order(sample_ids: Sequence[str], seed: int) -> list[str]:
    """Every sample id once, in an order that depends only on the set of ids and the seed."""
    order = sorted(sample_ids)
    random.Random(seed).shuffle(order)
    return order


def slice_bounds(samples: int, slices: int) -> list[tuple[int, int]]:
    """`slices` contiguous [start, stop) parts covering range(samples); the first `samples % slices` are one longer."""
    if slices < 1:
        raise UserError(f"slices must be at least 1, not {slices}")
    if slices > samples:
        raise UserError(f"slices {slices} is more than the {samples} samples to cut; set slices to at most {samples}")
    size, extra = divmod(samples, slices)
    bounds, start = [], 0
    for index in range(slices):
        stop = start + size + (index < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def corpus_ids(tokenized: Path) -> list[str]:
    """The sample ids of a finished tokenized folder, in shard order."""
    manifest = read_manifest(tokenized, kind="tokenized")
    ids: list[str] = []
    for entry in manifest["shards"]:
        ids += read_shard(Path(tokenized) / entry["file"], "tokenized", columns=["sample_id"]).column("sample_id").to_pylist()
    return ids


def _rows_in_order(tokenized: Path, manifest: dict[str, Any], wanted: Sequence[str]) -> pa.Table:
    """The rows of `wanted`, in the order given, read shard by shard (each filtered before it is kept)."""
    position = {sample_id: index for index, sample_id in enumerate(wanted)}
    keys = pa.array(list(wanted), type=pa.string())
    parts = []
    for entry in manifest["shards"]:
        table = read_shard(Path(tokenized) / entry["file"], "tokenized")
        parts.append(table.filter(pc.is_in(table.column("sample_id"), value_set=keys)))
    rows = pa.concat_tables(parts)
    found = rows.column("sample_id").to_pylist()
    if len(found) != len(wanted):
        missing = sorted(set(wanted) - set(found))[:3]
        raise UserError(f"{tokenized} lacks sample ids {', '.join(missing)} of the slice; the corpus changed under the run")
    return rows.take(sorted(range(len(found)), key=lambda i: position[found[i]]))


def _chunks(table: pa.Table, rows_per_shard: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, rows_per_shard):
        yield table.slice(start, rows_per_shard)


def materialise_slice(
    tokenized: Path, sample_ids: Sequence[str], output: Path, rows_per_shard: int, description: dict[str, Any]
) -> dict[str, Any]:
    """Write the samples `sample_ids` of `tokenized` (in that order) as a tokenized folder; returns its manifest.

    description: what the slice is (round, epoch, index, seed...), recorded in the manifest under `slice`.
    A finished folder of the same slice is reused; a killed write resumes shard by shard.
    """
    source = read_manifest(tokenized, kind="tokenized")
    source_key = sha256_json([[s["file"], s["sha256"]] for s in source["shards"]])
    identity = {"source": source_key, "ids": sha256_json(list(sample_ids)), "rows_per_shard": rows_per_shard}

    def gathered() -> AbstractContextManager[pa.Table]:
        """The rows, gathered before anything is written (a sample id the corpus lacks is refused first)."""
        return nullcontext(_rows_in_order(tokenized, source, sample_ids))

    def work(out: StageOutput, rows: pa.Table) -> dict[str, Any]:
        shards = []
        for index, part in enumerate(_chunks(rows, rows_per_shard)):
            name, key = shard_name(index), sha256_json([identity, index])
            record = out.done(name, key) or out.commit(name, part, {"run_key": key})
            shards.append({"file": name, "rows": record["rows"], "sha256": record["sha256"]})
        return base_manifest("tokenized", {"slice_of": str(tokenized), "rows_per_shard": rows_per_shard}) | {
            "tokenizer": source["tokenizer"],
            "input_fingerprint": source_key,
            "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
            "inputs": [{"kind": "tokenized", "path": str(tokenized), "data_fingerprint": source_key}],
            "slice": description | {"samples": len(sample_ids)},
            "shards": shards,
            "counts": {
                "rows_written": rows.num_rows,
                "tokens": int(pc.sum(rows.column("n_tokens")).as_py() or 0),
                "trainable_tokens": int(pc.sum(rows.column("n_trainable")).as_py() or 0),
            },
        }

    return run_stage(Stage("tokenized", output, identity, inputs=[tokenized]), work, ready=gathered).manifest
