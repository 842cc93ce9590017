"""The sample filter over a scores folder: one pass that finds the corpus-wide cut, before any token is selected.

`sample_ratio < 1` makes a selection two-level (TailSFT, T-SHIRT select whole samples from token
scores). `find_sample_filter` reads every shard once (a plain function per shard, as the global
selection's passes: the caller may run them in parallel) and returns each sample's roll-up, id,
source and target count; the driver sorts them (samples are few next to tokens: one float and one
id each), finds the cut (`pipeline.selection.sample_rollups`) and counts what it drops. The token
selection that follows (per sample or global) reads the cut from `CorpusSelection.sample_cut`, so
in place and apart (`select --output`) drop the same samples. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.selection.global_selection import ParallelMap, joined_shard, serial_map
from pipeline.selection.keep_tables import CorpusSelection
from pipeline.selection.sample_rollups import SampleCut, filter_summary, find_cut, stays
from pipeline.selection.select_settings import SelectSettings


@dataclass(frozen=True)
class ShardRollups:
    """One shard's samples as the filter sees them, in row order."""

    sample_ids: np.ndarray
    sources: np.ndarray
    targets: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class SampleFilter:
    """The cut a corpus gave and what it drops (`sample_rollups.filter_summary`)."""

    cut: SampleCut | None
    summary: dict[str, Any]


def refuse_rel_rollup_over_one_checkpoint(settings: SelectSettings) -> None:
    """REL is 0 at every target when current and history are one checkpoint: every sample would tie."""
    if settings.sample_rollup_column == "rel":
        raise UserError(
            "sample_by rel ranks samples by their mean REL, but current and history are the same checkpoint: every REL "
            "is 0 and the sample id alone would decide; score with a history checkpoint that differs, or filter by "
            "sample_by score, entropy or loss"
        )


def shard_rollups(score_path: Path, tokenized_path: Path, selection: CorpusSelection) -> ShardRollups:
    """Pass 0 of a two-level selection: one shard's sample ids, sources, target counts and roll-ups."""
    scores, trainable = joined_shard(score_path, tokenized_path, selection.columns)
    tokenized = pq.read_table(tokenized_path, columns=["source", "n_trainable"])
    return ShardRollups(
        np.asarray(scores.column("sample_id").to_pylist(), dtype=str),
        np.asarray(tokenized.column("source").to_pylist(), dtype=str),
        tokenized.column("n_trainable").to_numpy().astype(np.int64),
        selection.sample_rollups(scores, trainable),
    )


def find_sample_filter(
    shards: Sequence[tuple[Path, Path]], selection: CorpusSelection, parallel_map: ParallelMap = serial_map
) -> SampleFilter:
    """The corpus-wide cut keeping ceil(sample_ratio * samples) over (score shard, tokenized shard) pairs, and what it
    drops (in samples and targets, per source)."""
    parts = list(parallel_map(shard_rollups, [(s, t, selection) for s, t in shards]))
    values, ids, sources, targets = (
        np.concatenate([getattr(p, name) for p in parts]) if parts else np.zeros(0)
        for name in ("values", "sample_ids", "sources", "targets")
    )
    cut = find_cut(values, ids, selection.settings.sample_ratio)
    return SampleFilter(cut, filter_summary(stays(values, ids, cut), sources, targets))
