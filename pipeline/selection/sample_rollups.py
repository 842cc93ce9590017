"""The sample filter's arithmetic: each sample's roll-up, the corpus-wide cut, and which samples stay.

A two-level selection (`sample_ratio < 1`) first ranks every sample of the corpus by its roll-up,
the mean over its targets of one per-token value (`sample_by`: the method's score, or a stored
signal), highest first, ties to the smaller sample id, a sample without targets (no mean) last.
The first ceil(sample_ratio * samples) stay; the rest are dropped whole. Tokens are then selected
within the samples that stay.

The cut is the last sample that stays, its roll-up and its id: a sample stays when its roll-up is
above the cut's, or equal to it and its id is not after the cut's. Every shard recomputes its
samples' roll-ups with `rollup_means` over the same stored values, so the comparison is exact and
no list of ids travels between passes. Pure numpy, one sample's arrays at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.selection.selection import keep_count


@dataclass(frozen=True)
class SampleCut:
    """The last sample that stays: its roll-up (-inf: it has no targets) and its id."""

    value: float
    sample_id: str

    def as_dict(self) -> dict[str, Any]:
        """As manifests and shard records carry it (null for -inf, which JSON cannot hold)."""
        return {"value": None if math.isinf(self.value) else self.value, "sample_id": self.sample_id}


def rollup_means(rows: list[np.ndarray], masks: list[np.ndarray]) -> np.ndarray:
    """Each row's float64 mean of its values over its targets (`masks`); -inf for a row without targets, so it ranks
    below every sample that has one."""
    means = np.full(len(rows), -np.inf, dtype=np.float64)
    for row, (values, mask) in enumerate(zip(rows, masks)):
        if mask.any():
            means[row] = np.asarray(values, dtype=np.float64)[mask].mean()
    return means


def find_cut(values: np.ndarray, sample_ids: np.ndarray, ratio: float) -> SampleCut | None:
    """The cut that keeps ceil(ratio * samples) of the corpus: roll-up descending, then sample id ascending.
    None when the corpus has no sample."""
    if not len(values):
        return None
    order = np.lexsort((sample_ids, -values))  # the last key is the primary one
    last = order[keep_count(ratio, len(values)) - 1]
    return SampleCut(float(values[last]), str(sample_ids[last]))


def stays(values: np.ndarray, sample_ids: np.ndarray | list[str], cut: SampleCut | None) -> np.ndarray:
    """Which samples the cut keeps (every one when there is no cut)."""
    if cut is None:
        return np.ones(len(values), dtype=bool)
    ids = np.asarray(sample_ids, dtype=str)
    return (values > cut.value) | ((values == cut.value) & (ids <= cut.sample_id))


def filter_summary(
    stay: np.ndarray, sources: np.ndarray, targets: np.ndarray
) -> dict[str, Any]:
    """What the filter kept and dropped, in samples and in targets, over the corpus and per source
    (samples = kept + dropped, targets = kept_targets + dropped_targets)."""

    def counts(where: np.ndarray) -> dict[str, int]:
        dropped = where & ~stay
        return {"samples": int(where.sum()), "kept": int((where & stay).sum()), "dropped": int(dropped.sum()),
                "targets": int(targets[where].sum()), "kept_targets": int(targets[where & stay].sum()),
                "dropped_targets": int(targets[dropped].sum())}

    everything = np.ones(len(stay), dtype=bool)
    return counts(everything) | {"by_source": {str(s): counts(sources == s) for s in np.unique(sources)}}
