"""`score_samples`: a current pass over samples held in memory, then the per-sample selection (tests, benchmarks).

The stages score shards (`pipeline.scoring.scorer.score_shard`); this is the same engine and the same
selection over plain lists, so a test or a benchmark can score a handful of literal samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.scoring.scorer import SampleSignals, Scorer, combine_signals
from pipeline.selection.methods import sample_keep, sample_score
from pipeline.selection.select_settings import SelectSettings


@dataclass
class SampleScores(SampleSignals):
    """A sample's signals plus its per-sample selection: `score` and `keep` (full length)."""

    score: np.ndarray
    keep: np.ndarray


def score_samples(
    scorer: Scorer,
    sample_ids: Sequence[str],
    input_ids: Sequence[np.ndarray],
    trainable: Sequence[np.ndarray],
    selection: SelectSettings,
    *,
    history_nll: Sequence[np.ndarray] | None = None,
    same_checkpoint: bool = False,
) -> list[SampleScores]:
    """Signals, then the per-sample selection, in input order. `history_nll`: the history pass's NLLs (full
    length), needed when the selection uses REL and the checkpoints differ."""
    signals = combine_signals(
        scorer.token_signals(sample_ids, input_ids, trainable), history_nll, trainable,
        same_checkpoint=same_checkpoint, uses_rel=selection.uses_rel, excess=scorer.settings.excess,
    )
    out = []
    for s, mask in zip(signals, trainable):
        score = sample_score(s.sample_id, s.rel, s.attn, mask, selection, nll_cur=s.nll_cur, nll_hist=s.nll_hist,
                             entropy_cur=s.entropy_cur)
        keep = sample_keep(score, mask, selection)
        out.append(SampleScores(s.sample_id, s.nll_cur, s.nll_hist, s.rel, s.attn, s.entropy_cur, score, keep))
    return out
