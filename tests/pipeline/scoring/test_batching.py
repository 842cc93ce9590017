import numpy as np
import pytest

from pipeline.scoring.batching import length_sorted_batches, right_padded


def test_batches_are_longest_first_and_fit_the_budget():
    lengths = [10, 50, 20, 50, 5, 30]
    batches = length_sorted_batches(lengths, max_batch_tokens=100)
    assert batches == [[1, 3], [5, 2, 0], [4]]
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 100
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))


def test_sample_longer_than_budget_gets_its_own_batch():
    assert length_sorted_batches([300, 10, 10], max_batch_tokens=100) == [[0], [1, 2]]


def test_bad_budget_is_refused():
    with pytest.raises(ValueError, match="max_batch_tokens"):
        length_sorted_batches([1], 0)


def test_right_padding():
    ids, mask = right_padded([np.array([5, 6, 7]), np.array([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0]]
