"""How well a selection dropped the known corrupted tokens, in measures that fit how it selects.

Each sample keeps exactly its top k of n trainable tokens (per-sample selection), so a measure pooled
over the corpus mixes samples that never compete, and "clean tokens dropped" is 1 - ratio for every
method by construction. What is measured instead, per round (`selection_tally`), then over the
rounds that count (`SelectionTally.merge`):

- `auroc_within`: within each corrupted sample, P(a clean token scores above a corrupted one)
  (ties one half), averaged over the corrupted samples; and the same average per corruption kind
  (`auroc_within:KIND`). 0.5 is chance (full scores every token alike, random at random); the oracle's is 1.
- `drop_share`: corrupted tokens dropped, as a share of what the oracle could drop under the same
  budget: per sample min(corrupted, dropped) summed over the samples (a per-sample selection), or
  min(corrupted, dropped) over the round (a global one). 1 is the oracle; NaN when nothing is dropped.
- `corrupted_dropped`: the share of corrupted tokens dropped (for scale: at ratio 0.6, random drops 0.4).
- `auroc_pooled`: a global selection only (it ranks every token of the round against every other):
  the AUROC over all the round's tokens, averaged over rounds; NaN for a per-sample selection.

Inputs are per-sample arrays, aligned (same length per sample); a token whose score is NaN (a
method that scores nothing) takes no part in an AUROC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from pipeline.runtime.errors import UserError

Granularity = Literal["sample", "global"]


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), ties counting one half (Mann-Whitney U).

    NaN when either class is empty.
    """
    score, positive = np.asarray(score, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    _, inverse, counts = np.unique(score, return_inverse=True, return_counts=True)
    first_rank = np.cumsum(counts) - counts + 1
    average_rank = first_rank + (counts - 1) / 2.0  # tied values share the mean of their ranks
    rank_sum = float(average_rank[inverse][positive].sum())
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


@dataclass
class SelectionTally:
    """The counts and per-sample AUROCs of one round (or several merged), from which the measures follow."""

    corrupted: int = 0
    dropped: int = 0  # corrupted tokens the selection dropped
    oracle_droppable: int = 0  # corrupted tokens the oracle could drop with the same budget
    within: list[tuple[str | None, float]] = field(default_factory=list)  # (kind, AUROC) per corrupted sample
    pooled: list[float] = field(default_factory=list)  # per round, global selection only

    def merge(self, other: SelectionTally) -> SelectionTally:
        return SelectionTally(self.corrupted + other.corrupted, self.dropped + other.dropped,
                              self.oracle_droppable + other.oracle_droppable, self.within + other.within,
                              self.pooled + other.pooled)

    def figures(self, kinds: Sequence[str] = ()) -> dict[str, float]:
        """The measures (NaN where undefined); `kinds`: the corruption kinds to report `auroc_within:KIND` for."""
        figures = {
            "corrupted_dropped": self.dropped / self.corrupted if self.corrupted else math.nan,
            "drop_share": self.dropped / self.oracle_droppable if self.oracle_droppable else math.nan,
            "auroc_within": _mean([value for _, value in self.within]),
            "auroc_pooled": _mean(self.pooled),
        }
        for kind in kinds:
            figures[f"auroc_within:{kind}"] = _mean([value for k, value in self.within if k == kind])
        return figures


def _arrays(keep: Any, score: Any, trainable: Any, corrupted: Any) -> list[tuple[np.ndarray, ...]]:
    """Per sample (keep, score, trainable, corrupted), checked to line up token for token."""
    columns = [list(keep), list(score), list(trainable), list(corrupted)]
    if len({len(c) for c in columns}) != 1:
        raise UserError(f"keep, score, trainable and corrupted must hold the same samples, got {[len(c) for c in columns]}")
    samples = []
    for index, (k, s, t, c) in enumerate(zip(*columns)):
        sample = (np.asarray(k, bool), np.asarray(s, np.float64), np.asarray(t, bool), np.asarray(c, bool))
        if len({len(a) for a in sample}) != 1:
            raise UserError(f"sample {index}: keep, score, trainable and corrupted must line up token for token, got "
                            f"lengths {[len(a) for a in sample]}")
        if (sample[3] & ~sample[2]).any():
            raise UserError(f"sample {index}: a corrupted flag is set on a token that is not trainable; labels and "
                            "tokens do not line up")
        if (sample[0] & ~sample[2]).any():
            raise UserError(f"sample {index}: keep is set on a token that is not trainable; masks and tokens do not "
                            "line up")
        samples.append(sample)
    return samples


def selection_tally(keep: Any, score: Any, trainable: Any, corrupted: Any, *,
                    kinds: Sequence[str | None] | None = None, granularity: Granularity = "sample") -> SelectionTally:
    """One round's tally: per-sample sequences of keep, score, trainable and corrupted flags (aligned);
    `kinds`: each sample's corruption kind (None for a clean one); `granularity`: how the round selected."""
    samples = _arrays(keep, score, trainable, corrupted)
    kinds = list(kinds) if kinds is not None else [None] * len(samples)
    if len(kinds) != len(samples):
        raise UserError(f"{len(kinds)} corruption kinds for {len(samples)} samples")
    tally = SelectionTally()
    dropped_by_budget = 0
    pooled_scores, pooled_clean = [], []
    for (k, s, t, c), kind in zip(samples, kinds):
        bad, budget = int(c.sum()), int((t & ~k).sum())  # corrupted targets; targets the selection dropped
        tally.corrupted += bad
        tally.dropped += int((c & ~k).sum())
        tally.oracle_droppable += min(bad, budget)
        dropped_by_budget += budget
        scored = t & ~np.isnan(s)
        if bad:
            tally.within.append((kind, auroc(s[scored], ~c[scored])))
        pooled_scores.append(s[scored])
        pooled_clean.append(~c[scored])
    if granularity == "global":
        # One budget over the round: the oracle spends it on the corrupted tokens wherever they are.
        tally.oracle_droppable = min(tally.corrupted, dropped_by_budget)
        if pooled_scores:
            tally.pooled.append(auroc(np.concatenate(pooled_scores), np.concatenate(pooled_clean)))
    return tally
