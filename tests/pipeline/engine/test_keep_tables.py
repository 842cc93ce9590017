"""Keep masks rewritten from stored scores: per sample at a new ratio, and the column replacement."""

import numpy as np
import pyarrow as pa
import pytest

from pipeline.engine.keep_tables import flat_values, per_sample_keep, with_keep
from pipeline.artifacts.schemas import arrow_schema
from pipeline.engine.selection import select_sample


def _scores_table(scores: list[np.ndarray], keep: list[np.ndarray]) -> pa.Table:
    nan = [np.full(len(s), np.nan, dtype=np.float32) for s in scores]
    lists = lambda arrays, kind: pa.array([a.tolist() for a in arrays], pa.list_(kind))  # noqa: E731
    return pa.Table.from_arrays(
        [pa.array([f"s{i}" for i in range(len(scores))]), *(lists(nan, pa.float32()) for _ in range(4)),
         lists(scores, pa.float32()), lists(keep, pa.bool_()),
         pa.array([len(s) for s in scores], pa.int32()), pa.array([0] * len(scores), pa.int32()),
         pa.array([int(k.sum()) for k in keep], pa.int32())],
        schema=arrow_schema("scores"),
    )


def test_per_sample_keep_matches_the_scorer_selection():
    rng = np.random.default_rng(0)
    scores = [rng.random(n).astype(np.float32) for n in (7, 1, 12)]
    scores[2][3] = scores[2][5]  # a tie: the earlier position wins
    masks = [np.arange(len(s)) >= 2 for s in scores]
    table = _scores_table(scores, [np.zeros(len(s), bool) for s in scores])
    trainable = pa.chunked_array([pa.array([m.tolist() for m in masks], pa.list_(pa.bool_()))])
    out = per_sample_keep(table, trainable, 0.5)
    expected = [select_sample(np.where(m, s, np.nan).astype(np.float32), m, 0.5) for s, m in zip(scores, masks)]
    assert np.array_equal(flat_values(out.column("keep")).astype(bool), np.concatenate(expected))
    assert out.column("n_kept").to_pylist() == [int(e.sum()) for e in expected] == [3, 0, 5]
    assert out.column("score").equals(table.column("score")) and out.schema.equals(table.schema)


def test_mismatched_lengths_are_refused():
    table = _scores_table([np.zeros(3, np.float32)], [np.zeros(3, bool)])
    with pytest.raises(ValueError, match="2 entries for 3 tokens"):
        with_keep(table, np.zeros(2, bool))
    other = pa.chunked_array([pa.array([[False, True]], pa.list_(pa.bool_()))])
    with pytest.raises(ValueError, match="different data"):
        per_sample_keep(table, other, 0.5)
