"""Selection measures on literal tokens and on synthetic selections: the oracle scores 1, full and random about 0.5."""

import math

import numpy as np
import pytest

from pipeline.eval.selection_measures import SelectionTally, auroc, selection_tally
from pipeline.runtime.errors import UserError
from pipeline.selection.methods import sample_keep, sample_score
from pipeline.selection.select_settings import SelectSettings

nan = np.nan


def test_auroc_against_a_hand_count_with_ties():
    # clean scores 3, 2, 2 against corrupted 2, 1: of the 6 pairs, 4 are won, 2 tied (2 vs 2): 5/6
    assert auroc(np.array([3, 2, 2, 2, 1]), np.array([True, True, True, False, False])) == pytest.approx(5 / 6)
    assert auroc(np.array([1.0, 1.0, 1.0]), np.array([True, False, True])) == 0.5  # all tied
    assert auroc(np.array([0.9, 0.8, 0.1]), np.array([True, True, False])) == 1.0
    assert auroc(np.array([0.1, 0.2, 0.9]), np.array([True, True, False])) == 0.0
    assert math.isnan(auroc(np.array([0.1, 0.2]), np.array([True, True])))


# Sample 0: two context tokens, three targets, one corrupted. Sample 1: one context token, four targets, two
# corrupted. Sample 2: clean, two targets.
TRAINABLE = [[False, False, True, True, True], [False, True, True, True, True], [False, True, True]]
CORRUPTED = [[False, False, True, False, False], [False, False, True, True, False], [False, False, False]]
SCORE = [[nan, nan, 0.1, 0.9, 0.5], [nan, 0.7, 0.2, 0.7, 0.3], [nan, 0.4, 0.6]]
KEEP = [[False, False, False, True, True], [False, True, False, True, False], [False, False, True]]


def test_the_measures_by_hand_on_literal_tokens():
    tally = selection_tally(KEEP, SCORE, TRAINABLE, CORRUPTED, kinds=["filler", "shuffled", None])
    # corrupted: (0,2) dropped, (1,2) dropped, (1,3) kept -> 2 of 3
    assert (tally.corrupted, tally.dropped) == (3, 2)
    # the oracle with the same per-sample budget: sample 0 drops 1 (1 corrupted), sample 1 drops 2 (2 corrupted),
    # sample 2 drops 1 (none corrupted) -> 1 + 2 + 0 = 3
    assert tally.oracle_droppable == 3
    # within sample 0: clean 0.9, 0.5 vs corrupted 0.1 -> 1; within sample 1: clean 0.7, 0.3 vs corrupted 0.2, 0.7:
    # 0.7 beats 0.2 and ties 0.7 (1.5), 0.3 beats 0.2 (1) -> 2.5 / 4; the clean sample has no AUROC
    assert tally.within == [("filler", 1.0), ("shuffled", 0.625)]
    figures = tally.figures(kinds=["filler", "shuffled", "wrong_result"])
    assert figures["corrupted_dropped"] == pytest.approx(2 / 3) and figures["drop_share"] == pytest.approx(2 / 3)
    assert figures["auroc_within"] == pytest.approx((1.0 + 0.625) / 2)
    assert figures["auroc_within:filler"] == 1.0 and figures["auroc_within:shuffled"] == 0.625
    assert math.isnan(figures["auroc_within:wrong_result"])
    assert math.isnan(figures["auroc_pooled"])  # a per-sample selection has no pooled AUROC


def test_a_global_selection_gets_a_pooled_auroc_and_the_oracle_budget_of_the_whole_round():
    tally = selection_tally(KEEP, SCORE, TRAINABLE, CORRUPTED, granularity="global")
    # dropped over the round: 1 + 2 + 1 = 4 targets; the oracle spends them on the 3 corrupted ones wherever they are
    assert tally.oracle_droppable == 3
    clean = [0.9, 0.5, 0.7, 0.3, 0.4, 0.6]
    bad = [0.1, 0.2, 0.7]
    wins = sum((c > b) + 0.5 * (c == b) for c in clean for b in bad)
    assert tally.figures()["auroc_pooled"] == pytest.approx(wins / (len(clean) * len(bad)))
    merged = tally.merge(selection_tally(KEEP, SCORE, TRAINABLE, CORRUPTED, granularity="global"))
    assert merged.corrupted == 6 and len(merged.within) == 4 and merged.figures() == tally.figures()


def _synthetic_round(method: str, granularity: str = "sample", samples: int = 200, seed: int = 0):
    """A round of samples with corrupted runs, selected by the real selection code (ratio 0.6)."""
    rng = np.random.default_rng(seed)
    keep, score, trainable, corrupted = [], [], [], []
    settings = SelectSettings(method=method, ratio=0.6, seed=seed, granularity=granularity,
                              labels="labels.parquet" if method == "oracle" else None)
    for index in range(samples):
        n = int(rng.integers(12, 30))
        t = np.ones(n, bool)
        t[0] = False
        c = np.zeros(n, bool)
        if index % 3 == 0:
            start = int(rng.integers(1, n - 3))
            c[start:start + 3] = True
        s = sample_score(f"s{index}", np.full(n, nan), np.full(n, nan), t, settings, drop=c)
        keep.append(sample_keep(s, t, settings))
        score.append(s)
        trainable.append(t)
        corrupted.append(c)
    return keep, score, trainable, corrupted


@pytest.mark.parametrize("method, within, share", [
    ("oracle", (1.0, 1.0), (1.0, 1.0)),  # drops every corrupted token it can, ranks every clean one above them
    ("full", (0.5, 0.5), None),  # every score alike: chance; drops nothing, so no share of the oracle's
    ("random", (0.4, 0.6), (0.25, 0.55)),  # chance within; drops about 40% of the corrupted, of the oracle's ~100%
])
def test_oracle_full_and_random_on_a_synthetic_round(method, within, share):
    figures = selection_tally(*_synthetic_round(method)).figures()
    assert within[0] <= figures["auroc_within"] <= within[1], figures
    if share is None:
        assert math.isnan(figures["drop_share"]) and figures["corrupted_dropped"] == 0.0
    else:
        assert share[0] <= figures["drop_share"] <= share[1], figures


def test_the_oracle_of_a_global_selection_reaches_the_global_oracle_budget():
    figures = selection_tally(*_synthetic_round("oracle", "sample"), granularity="global").figures()
    assert figures["auroc_pooled"] == 1.0 and figures["auroc_within"] == 1.0
    assert figures["drop_share"] == 1.0  # per sample it can drop every corrupted token: 3 of >= 4 dropped (11+ targets at ratio 0.6)


def test_empty_tally_is_nan_everywhere():
    figures = SelectionTally().figures(kinds=["filler"])
    assert all(math.isnan(v) for v in figures.values())


@pytest.mark.parametrize("keep, corrupted, message", [
    ([[True, True]], [[False, False, False]], "sample 0: keep, score, trainable and corrupted must line up"),
    ([[True, False, True]], [[True, False, False]], "sample 0: a corrupted flag is set on a token that is not trainable"),
    ([[True, True, True]], [[False, False, False]], "sample 0: keep is set on a token that is not trainable"),
    ([[False, True, True], [False, True, True]], [[False, False, False]], "must hold the same samples"),
])
def test_misaligned_inputs_are_refused(keep, corrupted, message):
    with pytest.raises(UserError, match=message):
        selection_tally(keep, [[0.1, 0.2, 0.3]] * len(keep), [[False, True, True]] * len(keep), corrupted)
