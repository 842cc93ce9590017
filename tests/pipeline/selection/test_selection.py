import numpy as np
import pytest

from pipeline.selection.selection import combine, keep_count, minmax_normalise, sortable_keys, top_k_mask

NAN = np.nan


def test_minmax_uses_trainable_entries_only():
    values = np.array([NAN, 100.0, 1.0, 3.0, NAN, 2.0], dtype=np.float32)
    trainable = np.array([False, False, True, True, False, True])
    out = minmax_normalise(values, trainable)
    np.testing.assert_allclose(out[trainable], [0.0, 1.0, 0.5], atol=1e-6)
    assert np.isnan(out[~trainable]).all()


def test_minmax_constant_values_give_zero():
    out = minmax_normalise(np.array([NAN, 4.0, 4.0], dtype=np.float32), np.array([False, True, True]))
    np.testing.assert_array_equal(out[1:], [0.0, 0.0])


def test_combine_weights_and_ignores_unused_nan_signal():
    rel = np.array([0.0, 1.0], dtype=np.float32)
    attn = np.array([0.5, 0.25], dtype=np.float32)
    np.testing.assert_allclose(combine(rel, attn, 0.5), [0.25, 0.625])
    np.testing.assert_array_equal(combine(rel, np.full(2, NAN, np.float32), 1.0), rel)
    np.testing.assert_array_equal(combine(np.full(2, NAN, np.float32), attn, 0.0), attn)


@pytest.mark.parametrize(("ratio", "n", "k"), [(0.6, 5, 3), (0.7, 10, 7), (0.6, 1, 1), (1.0, 4, 4), (0.01, 3, 1), (0.5, 0, 0)])
def test_keep_count_is_ceil_without_float_noise(ratio, n, k):
    assert keep_count(ratio, n) == k


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_keep_count_rejects_bad_ratio(ratio):
    with pytest.raises(ValueError, match="ratio"):
        keep_count(ratio, 3)


def test_sortable_keys_preserve_float_order():
    values = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5, np.inf], dtype=np.float32)
    keys = sortable_keys(values)
    assert (np.diff(keys.astype(np.int64)) >= 0).all()
    assert keys[3] < keys[4] or keys[3] == keys[4] - 1  # -0 just below +0
    assert sortable_keys(np.array([NAN], dtype=np.float32))[0] < sortable_keys(np.array([-np.inf], dtype=np.float32))[0]


def test_top_k_breaks_ties_by_earlier_position():
    scores = np.array([NAN, 0.5, 0.9, 0.5, 0.5, NAN], dtype=np.float32)
    trainable = np.array([False, True, True, True, True, False])
    assert top_k_mask(scores, trainable, 2).tolist() == [False, True, True, False, False, False]
    assert top_k_mask(scores, trainable, 3).tolist() == [False, True, True, True, False, False]


def test_top_k_at_a_ratio_never_keeps_context_and_handles_no_targets():
    scores = np.array([9.0, 0.1, 0.2, 9.0], dtype=np.float32)
    trainable = np.array([False, True, True, False])
    assert top_k_mask(scores, trainable, keep_count(0.5, 2)).tolist() == [False, False, True, False]
    assert not top_k_mask(scores, np.zeros(4, bool), keep_count(0.6, 0)).any()
