"""prob and entropy-gated: weighted selections over stored signals, per sample and corpus-wide, against hand
computations on literal signals; each kept token's weight is its score, 0 elsewhere."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.errors import UserError
from pipeline.runtime.schemas import arrow_schema
from pipeline.scoring.score_settings import SignalSet, signals_to_compute
from pipeline.selection.keep_tables import CorpusSelection, flat_values, selected_table
from pipeline.selection.methods import sample_score
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection_shards import apply_selection, plan_selection
from tests.pipeline.selection.test_current_signal_methods import _random_corpus, _write_corpus

NAN = np.nan
TRAINABLE = np.array([False, False, True, True, True, False, True])
NLL = [NAN, NAN, 2.0, 0.1, 0.7, NAN, 1.2]  # P = 0.135, 0.905, 0.497, 0.301
ENTROPY = [NAN, NAN, 0.3, 2.5, 1.0, NAN, 2.5]  # a tie at positions 3 and 6
VOCAB = 32  # ln 32 = 3.466: H / ln|V| = 0.087, 0.721, 0.289, 0.721


def _by_hand_weight(method: str, nll: float, entropy: float, vocab: int = VOCAB) -> np.float32:
    return np.float32(math.exp(-nll) if method == "prob" else min(1.0, max(0.0, entropy / math.log(vocab))))


def _selected(method: str, ratio: float, nll=NLL, entropy=ENTROPY, vocab: int = VOCAB, targets=TRAINABLE) -> pa.Table:
    """One sample's scores table (with its weight column) selected per sample by `method`."""
    n = len(nll)
    table = pa.table({
        "sample_id": ["s"], "nll_cur": [nll], "nll_hist": [[NAN] * n], "rel": [[NAN] * n], "attn": [[NAN] * n],
        "entropy_cur": [entropy], "score": [[NAN] * n], "keep": [[False] * n], "weight": [[0.0] * n],
        "n_tokens": [n], "n_trainable": [int(np.sum(targets))], "n_kept": [0],
    })
    table = table.cast(arrow_schema("scores"))
    trainable = pa.chunked_array([pa.array([list(map(bool, targets))], pa.list_(pa.bool_()))])
    return selected_table(table, trainable, CorpusSelection(SelectSettings(method=method, ratio=ratio), vocab_size=vocab))


def _kept_and_weight(table: pa.Table) -> tuple[list[int], np.ndarray]:
    return np.flatnonzero(flat_values(table.column("keep"))).tolist(), flat_values(table.column("weight"))


@pytest.mark.parametrize(("method", "ratio", "kept"), [
    ("prob", 0.5, [3, 4]),  # 0.905, 0.497
    ("prob", 0.75, [3, 4, 6]),
    ("prob", 1.0, [2, 3, 4, 6]),  # ratio 1: DFT's weighting of every target
    ("entropy-gated", 0.5, [3, 6]),  # 0.721 twice
    ("entropy-gated", 0.25, [3]),  # the tie goes to the earlier position
    ("entropy-gated", 1.0, [2, 3, 4, 6]),
])
def test_a_weighted_method_keeps_its_top_ratio_each_weighted_by_its_score(method, ratio, kept):
    got, weight = _kept_and_weight(_selected(method, ratio))
    assert got == kept
    expected = np.zeros(len(NLL), np.float32)
    for position in kept:
        expected[position] = _by_hand_weight(method, NLL[position], ENTROPY[position])
    np.testing.assert_allclose(weight, expected, rtol=1e-6, atol=0)
    assert (weight[~TRAINABLE] == 0).all()
    score = flat_values(_selected(method, ratio).column("score"))
    for position in np.flatnonzero(TRAINABLE):  # the score is the weight at every target, kept or not
        assert score[position] == pytest.approx(float(_by_hand_weight(method, NLL[position], ENTROPY[position])), rel=1e-6)


def test_a_weight_of_0_is_not_kept():
    """exp(-200) underflows float32 and an entropy of 0 gates everything: nothing to train, so not kept."""
    nll, entropy = [NAN, 200.0, 0.5], [NAN, 0.0, 1.0]
    for method in ("prob", "entropy-gated"):
        got, weight = _kept_and_weight(_selected(method, 1.0, nll, entropy, targets=[False, True, True]))
        assert got == [2] and weight.tolist()[:2] == [0, 0] and weight[2] > 0


def test_entropy_gated_clips_an_entropy_above_ln_v_to_1():
    """A row's entropy is at most ln|V|; float32 rounding of a near-uniform row may pass it by a hair."""
    _, weight = _kept_and_weight(_selected("entropy-gated", 1.0, [NAN, 1.0, 1.0], [NAN, math.log(8) * 1.0000001, 1.0], 8,
                                              targets=[False, True, True]))
    assert weight[1] == np.float32(1.0) and weight[2] == pytest.approx(1 / math.log(8), rel=1e-6)


def test_entropy_gated_needs_the_vocabulary_size():
    settings = SelectSettings(method="entropy-gated")
    with pytest.raises(UserError, match="entropy-gated needs the vocabulary size"):
        sample_score("x", np.array(NLL), np.array(NLL), TRAINABLE, settings, nll_cur=np.array(NLL),
                     entropy_cur=np.array(ENTROPY, np.float32))
    with pytest.raises(UserError, match=r"records no vocabulary size \(signals.vocab_size"):
        plan_selection([], settings, same_checkpoint=False, vocab_size=None)


def test_settings_of_the_weighted_methods():
    for method, signal in (("prob", "nll_cur"), ("entropy-gated", "entropy_cur")):
        settings = SelectSettings(method=method, ratio=0.4)
        assert settings.weighted and settings.ranked_signal == signal
        assert not (settings.uses_rel or settings.uses_attention)
        assert settings.selection_key() == {"method": method, "ratio": 0.4, "granularity": "sample"}
    assert not SelectSettings(method="entropy").weighted and not SelectSettings().weighted
    assert signals_to_compute("needed", SelectSettings(method="prob")) == SignalSet(False, False, False)
    assert signals_to_compute("needed", SelectSettings(method="entropy-gated")) == SignalSet(False, False, True)
    with pytest.raises(ValueError, match="min_prob is for method confidence only, not method prob"):
        SelectSettings(method="prob", min_prob=0.5)


# -- corpus-wide (granularity global), through the select step's own code --------------------------


def _by_hand_global(corpus: list, method: str, ratio: float) -> tuple[list, list]:
    """(keep, weight) per shard and row: every target sorted at once by its weight (descending), then shard, row,
    position; the top ceil(ratio * n), each weighted by its weight."""
    candidates = []
    for shard, samples in enumerate(corpus):
        for row, (nll, ent, trainable) in enumerate(samples):
            for position in np.flatnonzero(trainable):
                weight = _by_hand_weight(method, nll[position], ent[position], vocab=16)
                candidates.append((-float(weight), shard, row, int(position), weight))
    candidates.sort()
    keep = [[[False] * len(t) for _, _, t in samples] for samples in corpus]
    weights = [[[0.0] * len(t) for _, _, t in samples] for samples in corpus]
    for _, shard, row, position, weight in candidates[: math.ceil(round(ratio * len(candidates), 9))]:
        keep[shard][row][position] = True
        weights[shard][row][position] = float(weight)
    return keep, weights


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(("method", "ratio"), [("prob", 0.4), ("prob", 1.0), ("entropy-gated", 0.35)])
def test_global_weighted_selection_equals_the_hand_sort(tmp_path, seed, method, ratio):
    corpus = _random_corpus(seed)
    shards = _write_corpus(tmp_path, corpus)
    settings = SelectSettings(method=method, ratio=ratio, granularity="global")
    outcome = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False, vocab_size=16))
    keep, weights = _by_hand_global(corpus, method, ratio)
    tables = [pq.read_table(tmp_path / "masks" / s.file) for s in shards]
    assert [t.column("keep").to_pylist() for t in tables] == keep
    for table, expected in zip(tables, weights):
        for got, want in zip(table.column("weight").to_pylist(), expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    assert outcome.selection["method"] == method and outcome.selection["k"] == sum(map(sum, sum(keep, [])))


def test_per_sample_weighted_selection_through_the_select_step(tmp_path):
    corpus = _random_corpus(5)
    shards = _write_corpus(tmp_path, corpus)
    apply_selection(shards, plan_selection(shards, SelectSettings(method="prob", ratio=0.5), same_checkpoint=False))
    for shard, samples in zip(shards, corpus):
        table = pq.read_table(tmp_path / "masks" / shard.file)
        for got_keep, got_weight, sample in zip(table.column("keep").to_pylist(), table.column("weight").to_pylist(),
                                                samples):
            keep, weights = _by_hand_global([[sample]], "prob", 0.5)
            assert got_keep == keep[0][0]
            np.testing.assert_allclose(got_weight, weights[0][0], rtol=1e-6, atol=0)
