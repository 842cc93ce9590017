"""Score tables re-selected from their stored signals: per sample, and the column replacement."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.runtime.schemas import arrow_schema
from pipeline.selection.keep_tables import CorpusSelection, flat_values, selected_table, shard_rel_stats, with_selection
from pipeline.selection.methods import sample_score
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection import keep_count, top_k_mask


def _lists(arrays, kind):
    return pa.array([a.tolist() for a in arrays], pa.list_(kind))


def _scores_table(rel: list[np.ndarray], attn: list[np.ndarray]) -> pa.Table:
    nan = [np.full(len(r), np.nan, dtype=np.float32) for r in rel]
    return pa.Table.from_arrays(
        [pa.array([f"s{i}" for i in range(len(rel))]), _lists(nan, pa.float32()), _lists(nan, pa.float32()),
         _lists(rel, pa.float32()), _lists(attn, pa.float32()), _lists(nan, pa.float32()), _lists(nan, pa.float32()),
         _lists([np.zeros(len(r), bool) for r in rel], pa.bool_()), _lists([np.zeros(len(r)) for r in rel], pa.float32()),
         pa.array([len(r) for r in rel], pa.int32()), pa.array([0] * len(rel), pa.int32()),
         pa.array([0] * len(rel), pa.int32())],
        schema=arrow_schema("scores"),
    )


@pytest.fixture
def table_and_masks():
    rng = np.random.default_rng(0)
    masks = [np.arange(n) >= 2 for n in (7, 1, 12)]
    rel = [np.where(m, rng.normal(size=len(m)), np.nan).astype(np.float32) for m in masks]
    attn = [np.where(m, rng.random(len(m)), np.nan).astype(np.float32) for m in masks]
    attn[2][3] = attn[2][5]  # a tie: the earlier position wins
    trainable = pa.chunked_array([pa.array([m.tolist() for m in masks], pa.list_(pa.bool_()))])
    return _scores_table(rel, attn), trainable, rel, attn, masks


@pytest.mark.parametrize("method", ["sstoken", "rel", "attn", "random", "full"])
def test_per_sample_selection_is_the_per_sample_method_then_top_k(table_and_masks, method):
    table, trainable, rel, attn, masks = table_and_masks
    settings = SelectSettings(method=method, ratio=0.5)
    out = selected_table(table, trainable, CorpusSelection(settings))
    scores = [sample_score(f"s{i}", r, a, m, settings) for i, (r, a, m) in enumerate(zip(rel, attn, masks))]
    ratio = 1.0 if method == "full" else 0.5
    expected = [top_k_mask(s, m, keep_count(ratio, int(m.sum()))) for s, m in zip(scores, masks)]
    assert np.array_equal(flat_values(out.column("keep")).astype(bool), np.concatenate(expected))
    np.testing.assert_array_equal(flat_values(out.column("score")), np.concatenate(scores))
    assert out.column("n_kept").to_pylist() == [int(e.sum()) for e in expected]
    for name in ("sample_id", "n_tokens", "n_trainable"):
        assert out.column(name).equals(table.column(name))
    for name in ("nll_cur", "nll_hist", "rel", "attn"):  # NaN-aware: Arrow's equals says NaN != NaN
        np.testing.assert_array_equal(flat_values(out.column(name)), flat_values(table.column(name)))
    assert out.schema.equals(table.schema)


def test_attention_tie_goes_to_the_earlier_position(table_and_masks):
    table, trainable, *_ = table_and_masks
    out = selected_table(table, trainable, CorpusSelection(SelectSettings(method="attn", ratio=1 / 10)))
    assert out.column("n_kept").to_pylist() == [1, 0, 1]


def test_rel_stats_of_a_table(table_and_masks):
    table, trainable, rel, _, masks = table_and_masks
    stats = shard_rel_stats(table, trainable)
    assert stats.targets == sum(int(m.sum()) for m in masks)
    assert stats.abs_max == pytest.approx(max(float(np.nanmax(np.abs(r))) for r, m in zip(rel, masks) if m.any()))


def test_mismatched_lengths_are_refused(table_and_masks):
    table, *_ = table_and_masks
    one = table.slice(0, 1)
    with pytest.raises(ValueError, match="keep has 2 entries for 7 tokens"):
        with_selection(one, np.zeros(7, np.float32), np.zeros(2, bool))
    other = pa.chunked_array([pa.array([[False, True]], pa.list_(pa.bool_()))])
    with pytest.raises(ValueError, match="different data"):
        selected_table(one, other, CorpusSelection(SelectSettings()))
    with pytest.raises(ValueError, match="global selection passes its keep mask"):
        selected_table(one, table_and_masks[1].slice(0, 1), CorpusSelection(SelectSettings(granularity="global")))


def test_a_binary_selection_weighs_each_kept_token_1_and_a_weighted_one_stores_its_weights(table_and_masks):
    from pipeline.runtime.mask_weights import with_weight

    table, trainable, *_ = table_and_masks
    selection = CorpusSelection(SelectSettings(method="attn", ratio=0.5))
    binary = selected_table(with_weight(table), trainable, selection)
    keep = flat_values(binary.column("keep")).astype(bool)
    np.testing.assert_array_equal(flat_values(binary.column("weight")), keep.astype(np.float32))
    score = flat_values(binary.column("score"))
    weight = np.where(keep, np.arange(len(keep), dtype=np.float32) + 0.5, 0).astype(np.float32)
    weighted = with_selection(with_weight(table), score, keep, weight)
    np.testing.assert_array_equal(flat_values(weighted.column("weight")), weight)
    assert weighted.column("keep").equals(binary.column("keep"))


@pytest.mark.parametrize("change, message", [
    (lambda w, k: np.where(k, 0, w), "weight where kept: a weight is not > 0 where keep is true"),
    (lambda w, k: np.where(~k, 1, w), "weight where not kept: a weight is not 0 where keep is false"),
    (lambda w, k: np.where(k, np.nan, w), "weight not finite"),
    (lambda w, k: np.where(k, -1, w), "weight negative"),
])
def test_a_weighted_selection_with_bad_weights_is_refused(table_and_masks, change, message):
    from pipeline.runtime.mask_weights import with_weight

    table, trainable, *_ = table_and_masks
    selected = selected_table(table, trainable, CorpusSelection(SelectSettings(method="attn", ratio=0.5)))
    keep, score = flat_values(selected.column("keep")).astype(bool), flat_values(selected.column("score"))
    with pytest.raises(ValueError, match=message):
        with_selection(with_weight(table), score, keep, change(keep.astype(np.float32), keep).astype(np.float32))


def test_weights_for_a_scores_table_without_a_weight_column_are_refused_not_dropped(table_and_masks):
    table, trainable, *_ = table_and_masks
    table = table.drop_columns(["weight"])  # scores written before the scorer stored weights
    selected = selected_table(table, trainable, CorpusSelection(SelectSettings(method="attn", ratio=0.5)))
    keep, score = flat_values(selected.column("keep")).astype(bool), flat_values(selected.column("score"))
    assert "weight" not in selected.column_names
    with pytest.raises(ValueError, match="a weighted selection needs a 'weight' column"):
        with_selection(table, score, keep, keep.astype(np.float32))
