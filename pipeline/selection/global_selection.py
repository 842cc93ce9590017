"""Exact corpus-wide top-k selection over score shards, in bounded memory.

`--granularity global` keeps exactly the top `k = ceil(ratio * total_trainable)` trainable tokens
of the whole corpus by score. Gathering every score on one machine does not scale, so the
threshold is found with histograms that never grow with the corpus:

0. Every pass computes the shard's scores from its stored signals (`CorpusSelection.shard_candidates`:
   the selection method, applied per sample), so nothing is written until the keep masks are known.
   With a sample filter, the candidates are the targets of the samples it keeps (k counts only those).
1. Each float32 score maps to a uint32 key whose unsigned order is the float order
   (`pipeline.selection.selection.sortable_keys`). A histogram of the high 16 bits of every key (65,536
   bins) finds the bin that holds the k-th largest key (`locate_threshold_bin`).
2. A histogram of the low 16 bits of the keys inside that bin gives the exact k-th largest key
   `t` (`locate_threshold`), and how many keys are strictly greater.
3. Per shard: the number of keys equal to `t` (`count_ties`), so ties can be broken in global
   order (shard order, then row order, then position) without seeing other shards.
4. Per shard: keep every key > t plus the first `take` ties of that shard (`apply_threshold`).

Every pass is a function of one shard's files that returns a few integers or one histogram; the
caller may run them in parallel (the score job does so with Ray tasks), but nothing here knows
about Ray. Candidates are the trainable tokens of the tokenized input (joined by row, after
checking sample ids), so a score that is NaN at a trainable position still counts (it sorts
lowest) and context tokens are never kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.selection.keep_tables import CorpusSelection, flat_values, selected_table
from pipeline.selection.methods import limited_keep, selection_size as method_selection_size
from pipeline.selection.selection import sortable_keys

BINS = 1 << 16


def joined_shard(
    score_path: Path, tokenized_path: Path, columns: list[str] | None = None
) -> tuple[pa.Table, pa.ChunkedArray]:
    """(the score shard's signal `columns`, default sample_id, rel, attn; the tokenized shard's trainable
    column), checked to be one data."""
    scores = pq.read_table(score_path, columns=columns or ["sample_id", "rel", "attn"])
    tokenized = pq.read_table(tokenized_path, columns=["sample_id", "trainable"])
    if not scores.column("sample_id").equals(tokenized.column("sample_id")):
        raise UserError(f"{score_path} and {tokenized_path} hold different sample ids or row orders")
    if not pc.list_value_length(scores.column("rel")).equals(pc.list_value_length(tokenized.column("trainable"))):
        raise UserError(f"{score_path}: signal lengths differ from the trainable masks of {tokenized_path}")
    return scores, tokenized.column("trainable")


def trainable_keys(score_path: Path, tokenized_path: Path, selection: CorpusSelection) -> np.ndarray:
    """Keys of one shard's candidate tokens under `selection`, in row order then position order."""
    scores, trainable = joined_shard(score_path, tokenized_path, selection.columns)
    score, candidates = selection.shard_candidates(scores, trainable)
    return sortable_keys(score[candidates])


def high_histogram(score_path: Path, tokenized_path: Path, selection: CorpusSelection) -> np.ndarray:
    """Pass 1: counts of the high 16 bits of one shard's keys (65,536 int64 bins)."""
    keys = trainable_keys(score_path, tokenized_path, selection)
    return np.bincount(keys >> 16, minlength=BINS).astype(np.int64)


def low_histogram(score_path: Path, tokenized_path: Path, selection: CorpusSelection, high_bin: int) -> np.ndarray:
    """Pass 2: counts of the low 16 bits of the keys whose high 16 bits equal `high_bin`."""
    keys = trainable_keys(score_path, tokenized_path, selection)
    inside = keys[(keys >> 16) == high_bin]
    return np.bincount(inside & 0xFFFF, minlength=BINS).astype(np.int64)


def count_ties(score_path: Path, tokenized_path: Path, selection: CorpusSelection, threshold: int) -> tuple[int, int]:
    """Pass 3: (keys > threshold, keys == threshold) of one shard."""
    keys = trainable_keys(score_path, tokenized_path, selection)
    return int(np.count_nonzero(keys > threshold)), int(np.count_nonzero(keys == threshold))


def _walk_down(histogram: np.ndarray, rank: int) -> tuple[int, int]:
    """The highest bin b with (sum of bins above b) < rank <= (sum of bins from b up); returns (b, above)."""
    from_top = np.cumsum(histogram[::-1])
    index = int(np.searchsorted(from_top, rank))  # first position where the running sum reaches rank
    if index >= len(histogram):
        raise UserError(f"rank {rank} exceeds the {int(from_top[-1])} keys counted")
    above = int(from_top[index - 1]) if index else 0
    return len(histogram) - 1 - index, above


def locate_threshold_bin(high_total: np.ndarray, k: int) -> tuple[int, int]:
    """Pass 1 result: (the high bin holding the k-th largest key, number of keys in higher bins)."""
    return _walk_down(high_total, k)


@dataclass(frozen=True)
class Threshold:
    """The k-th largest key and what it takes to keep exactly k tokens."""

    key: int  # the k-th largest key
    greater: int  # keys strictly above it, corpus-wide
    ties_to_keep: int  # k - greater: how many keys equal to `key` are kept, first in global order

    def as_dict(self) -> dict[str, int]:
        return {"key": self.key, "greater": self.greater, "ties_to_keep": self.ties_to_keep}


def locate_threshold(high_bin: int, above_bin: int, low_total: np.ndarray, k: int) -> Threshold:
    """Pass 2 result: the exact threshold key from the low histogram of the threshold bin."""
    low_bin, above_in_bin = _walk_down(low_total, k - above_bin)
    greater = above_bin + above_in_bin
    return Threshold(key=(high_bin << 16) | low_bin, greater=greater, ties_to_keep=k - greater)


def tie_quotas(ties_per_shard: list[int], ties_to_keep: int) -> list[int]:
    """How many of each shard's ties to keep: the first `ties_to_keep` in shard order."""
    quotas, remaining = [], ties_to_keep
    for ties in ties_per_shard:
        take = min(ties, remaining)
        quotas.append(take)
        remaining -= take
    if remaining:
        raise UserError(f"{remaining} ties to keep were not found in any shard; the shards changed mid-run")
    return quotas


def apply_threshold(
    scores: pa.Table, trainable: pa.ChunkedArray, selection: CorpusSelection, threshold: int | None, take_ties: int
) -> pa.Table:
    """Pass 4: the score table with `score`/`keep`/`n_kept` rewritten to the global selection.

    Keeps trainable tokens whose key exceeds `threshold`, plus the first `take_ties` tokens whose
    key equals it, in row then position order. `threshold=None` keeps nothing (k = 0). `limited_keep` then drops
    what a method's limit drops (confidence's min_prob, a weighted method's weight 0), as per sample.
    """
    keep = np.zeros(len(flat_values(trainable)), dtype=bool)
    if threshold is not None:
        score, candidates = selection.shard_candidates(scores, trainable)
        positions = np.flatnonzero(candidates)
        keys = sortable_keys(score[positions])
        keep[positions[keys > threshold]] = True
        keep[positions[keys == threshold][:take_ties]] = True
        keep = limited_keep(keep, score, selection.settings)
    return selected_table(scores, trainable, selection, keep)


# parallel_map(function, argument tuples) -> results in argument order; the default runs in-process.
ParallelMap = Callable[[Callable, list[tuple]], Iterable]


def serial_map(function: Callable, arguments: list[tuple]) -> Iterator:
    return (function(*args) for args in arguments)


def selection_size(selection: CorpusSelection, total_trainable: int) -> int:
    """k over the whole corpus: the same rounding as the method's per-sample selection."""
    return method_selection_size(selection.settings, total_trainable)


def find_threshold(
    shards: list[tuple[Path, Path]], selection: CorpusSelection, k: int, parallel_map: ParallelMap = serial_map
) -> tuple[Threshold | None, list[int]]:
    """Passes 1-3 over (score shard, tokenized shard) pairs: the threshold and each shard's tie quota.

    Only histograms (summed as they arrive) and two integers per shard reach the caller, so memory
    stays bounded whatever the corpus size. Returns (None, zeros) when k is 0.
    """
    if k == 0:
        return None, [0] * len(shards)
    high_total = np.zeros(BINS, dtype=np.int64)
    for histogram in parallel_map(high_histogram, [(s, t, selection) for s, t in shards]):
        high_total += histogram
    high_bin, above_bin = locate_threshold_bin(high_total, k)
    low_total = np.zeros(BINS, dtype=np.int64)
    for histogram in parallel_map(low_histogram, [(s, t, selection, high_bin) for s, t in shards]):
        low_total += histogram
    threshold = locate_threshold(high_bin, above_bin, low_total, k)
    counts = list(parallel_map(count_ties, [(s, t, selection, threshold.key) for s, t in shards]))
    if sum(greater for greater, _ in counts) != threshold.greater:
        raise UserError("the score shards changed between selection passes; rerun the job")
    return threshold, tie_quotas([ties for _, ties in counts], threshold.ties_to_keep)
