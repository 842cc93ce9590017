"""What an online training reads: the tokenized shards, and the history NLLs the score stage cached for them.

    source = open_online_data(tokenized_folder, history_folder_or_None)   # checks checksums and the cache
    index = online_index(source)                 # one row per sample with a target (SampleIndex; kept = targets)
    rows = load_online_samples(source, index, positions)   # sample_id, input_ids, trainable, history NLLs

The order is the masked trainer's (`pipeline.training.training_data.DataPlan` over this index): a pure function
of (seed, epoch), so a resumed run sees the same global batches. The history folder is the cache folder of one
(history checkpoint, tokenized data, dtype) (`pipeline.scoring.history_cache.history_cache_dir`): the score stage
fills it, shard by shard under the tokenized shards' names; a shard it lacks is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, read_manifest, verify_shards
from pipeline.scoring.history_cache import load_cached_history
from pipeline.selection.keep_tables import row_arrays
from pipeline.training.training_data import SampleIndex, shards_key


@dataclass(frozen=True)
class OnlineSource:
    """A tokenized folder (checksums verified) and the cache folder of its history NLLs (None: no REL)."""

    tokenized: Path
    manifest: dict[str, Any]
    history: Path | None

    @property
    def data_key(self) -> str:
        return shards_key(self.manifest)

    @property
    def shard_files(self) -> list[str]:
        return [shard["file"] for shard in self.manifest["shards"]]


@dataclass(frozen=True)
class OnlineRow:
    """One sample as an online step needs it (full length; history NaN off the targets, None without REL)."""

    sample_id: str
    input_ids: np.ndarray
    trainable: np.ndarray
    history_nll: np.ndarray | None


def open_online_data(tokenized: Path, history: Path | None) -> OnlineSource:
    """The tokenized folder checked against its manifest, and every shard's history NLLs present in `history`."""
    tokenized = Path(tokenized)
    if not tokenized.is_dir():
        raise ArtifactError(f"tokenized data folder {tokenized} does not exist; run `sstoken prepare` first")
    manifest = read_manifest(tokenized, kind="tokenized")
    verify_shards(tokenized, manifest)
    source = OnlineSource(tokenized, manifest, None if history is None else Path(history))
    if source.history is not None:
        missing = [f for f in source.shard_files if load_cached_history(source.history, f) is None]
        if missing:
            raise UserError(
                f"the history cache {source.history} lacks the NLLs of {len(missing)} of {len(source.shard_files)} "
                f"tokenized shards (first: {missing[0]}); run `sstoken score` over {tokenized} with this history "
                "checkpoint and cache first"
            )
    return source


def online_index(source: OnlineSource) -> SampleIndex:
    """Every sample with at least one target, in the tokenized shards' order (kept: its targets)."""
    frames = []
    for file in source.shard_files:
        table = pq.read_table(source.tokenized / file, columns=["sample_id", "n_tokens", "trainable"])
        frames.append(pl.from_arrow(table).with_columns(
            pl.lit(file).alias("file"), pl.int_range(pl.len()).alias("row"),
            pl.col("trainable").list.sum().fill_null(0).alias("targets"),
        ).drop("trainable"))
    joined = pl.concat(frames)
    eligible = joined.filter(pl.col("targets") > 0)
    if not len(eligible):
        raise UserError(f"no sample of {source.tokenized} has a trainable token ({len(joined)} samples); nothing to train")
    place = list(zip(eligible["file"].to_list(), eligible["row"].to_list()))
    return SampleIndex(
        sample_ids=eligible["sample_id"].to_list(),
        lengths=eligible["n_tokens"].to_numpy().astype(np.int64),
        kept=eligible["targets"].to_numpy().astype(np.int64),
        tokenized_place=place,
        masks_place=place,
        without_kept=len(joined) - len(eligible),
    )


def all_samples(source: OnlineSource) -> list[tuple[str, int, int]]:
    """(sample_id, n_tokens, targets) of every tokenized sample, in the shards' order."""
    out = []
    for file in source.shard_files:
        table = pq.read_table(source.tokenized / file, columns=["sample_id", "n_tokens", "trainable"])
        targets = [int(np.count_nonzero(m)) for m in row_arrays(table.column("trainable"), bool)]
        out += list(zip(table.column("sample_id").to_pylist(), table.column("n_tokens").to_pylist(), targets))
    return out


def _history_rows(source: OnlineSource, file: str, sample_ids: list[str]) -> list[np.ndarray]:
    table = load_cached_history(source.history, file)  # type: ignore[arg-type]
    if table is None:
        raise UserError(f"the history NLLs of {file} left the cache {source.history} while training; rerun")
    row_of = {sample_id: row for row, sample_id in enumerate(table.column("sample_id").to_pylist())}
    missing = [s for s in sample_ids if s not in row_of]
    if missing:
        raise UserError(f"the history cache {source.history / file} lacks sample {missing[0]!r}: it was made from "
                        "other data; delete it and run `sstoken score` again")
    nlls = row_arrays(table.column("nll"), np.float32)
    return [nlls[row_of[s]] for s in sample_ids]


def load_online_samples(source: OnlineSource, index: SampleIndex, positions: np.ndarray) -> dict[int, OnlineRow]:
    """The rows of the given index positions, read from their shards (each shard once)."""
    by_file: dict[str, list[int]] = {}
    for position in sorted({int(p) for p in positions}):
        by_file.setdefault(index.tokenized_place[position][0], []).append(position)
    rows: dict[int, OnlineRow] = {}
    for file, members in by_file.items():
        table = pq.read_table(source.tokenized / file, columns=["sample_id", "input_ids", "trainable"])
        table = table.take([index.tokenized_place[p][1] for p in members])
        ids = table.column("sample_id").to_pylist()
        if ids != [index.sample_ids[p] for p in members]:
            raise ArtifactError(f"{source.tokenized / file} changed while training; rerun sstoken train")
        history = _history_rows(source, file, ids) if source.history is not None else [None] * len(ids)
        for position, sample_id, input_ids, trainable, nll in zip(
            members, ids, row_arrays(table.column("input_ids"), np.int64), row_arrays(table.column("trainable"), bool),
            history,
        ):
            rows[position] = OnlineRow(sample_id, input_ids, trainable, nll)
    return rows
