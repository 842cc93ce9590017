"""Exact corpus-wide top-k: the histogram passes against a brute-force sort, ties included.

The shards hold the values to rank in `rel`, selected with method rel and no normalisation, so the
score each pass computes is the value itself."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import shard_name
from pipeline.runtime.schemas import table_from_rows
from pipeline.selection import global_selection as gs
from pipeline.selection.keep_tables import CorpusSelection
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection import sortable_keys

NAN = float("nan")


def _write_pair(folder: Path, index: int, samples: list[tuple[list[float], list[bool]]]) -> tuple[Path, Path]:
    """A score shard and its tokenized shard; only the columns selection reads carry meaning."""
    scores, tokenized = [], []
    for row, (values, trainable) in enumerate(samples):
        sample_id = f"s{index}-{row}"
        n = len(values)
        tokenized.append(
            {"sample_id": sample_id, "source": "t", "input_ids": list(range(n)), "trainable": trainable,
             "n_tokens": n, "n_trainable": sum(trainable), "n_turns": 1, "truncated": False}
        )
        floats = [NAN] * n
        scores.append(
            {"sample_id": sample_id, "nll_cur": floats, "nll_hist": floats, "rel": values, "attn": floats,
             "score": floats, "keep": [False] * n, "n_tokens": n, "n_trainable": sum(trainable), "n_kept": 0}
        )
    score_path, tokenized_path = folder / "scores" / shard_name(index), folder / "tokenized" / shard_name(index)
    for path in (score_path, tokenized_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table_from_rows(scores, "scores"), score_path)
    pq.write_table(table_from_rows(tokenized, "tokenized"), tokenized_path)
    return score_path, tokenized_path


def _brute_force(corpus: list[list[tuple[list[float], list[bool]]]], ratio: float) -> list[list[list[bool]]]:
    """Sort every trainable token at once: score descending (NaN last), then shard, row, position."""
    candidates = []
    for shard, samples in enumerate(corpus):
        for row, (values, trainable) in enumerate(samples):
            for position, (value, is_trainable) in enumerate(zip(values, trainable)):
                if is_trainable:
                    order = (1, 0.0) if math.isnan(value) else (0, -np.float32(value))
                    candidates.append((order, shard, row, position))
    candidates.sort()
    k = math.ceil(round(ratio * len(candidates), 9))
    keep = [[[False] * len(v) for v, _ in samples] for samples in corpus]
    for _, shard, row, position in candidates[:k]:
        keep[shard][row][position] = True
    return keep


def _flat(column) -> np.ndarray:
    return np.array([v for row in column.to_pylist() for v in row])


def _raw_rel(ratio: float) -> CorpusSelection:
    return CorpusSelection(SelectSettings(method="rel", normalise="none", ratio=ratio, granularity="global"))


def _select(tmp_path: Path, corpus, ratio: float) -> tuple[list[list[list[bool]]], list[int]]:
    pairs = [_write_pair(tmp_path, i, samples) for i, samples in enumerate(corpus)]
    total = sum(sum(t) for samples in corpus for _, t in samples)
    selection = _raw_rel(ratio)
    k = gs.selection_size(selection, total)
    threshold, quotas = gs.find_threshold(pairs, selection, k)
    kept, n_kept = [], []
    for (score_path, tokenized_path), quota in zip(pairs, quotas):
        table = gs.apply_threshold(
            pq.read_table(score_path), pq.read_table(tokenized_path).column("trainable"), selection,
            threshold.key if threshold else None, quota,
        )
        kept.append(table.column("keep").to_pylist())
        n_kept.extend(table.column("n_kept").to_pylist())
        assert [sum(k) for k in kept[-1]] == table.column("n_kept").to_pylist()
        # The ranked value is written next to the mask: the raw rel at targets, NaN elsewhere.
        ranked = np.where(_flat(pq.read_table(tokenized_path).column("trainable")), _flat(table.column("rel")), NAN)
        np.testing.assert_array_equal(_flat(table.column("score")), ranked.astype(np.float32))
    return kept, n_kept


def _random_corpus(rng: np.random.Generator, shards: int, values: np.ndarray) -> list:
    corpus = []
    for _ in range(shards):
        samples = []
        for _ in range(int(rng.integers(0, 5))):  # empty shards happen
            n = int(rng.integers(1, 30))
            trainable = [False] + [bool(b) for b in rng.random(n - 1) < 0.6]
            samples.append(([float(v) for v in rng.choice(values, n)], trainable))
        corpus.append(samples)
    return corpus


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ratio", [0.05, 0.37, 0.6, 1.0])
def test_global_keep_equals_brute_force_with_many_ties(tmp_path: Path, seed: int, ratio: float):
    rng = np.random.default_rng(seed)
    # Few distinct values: nearly every threshold falls among ties, which must go to earlier tokens.
    values = np.array([0.1, 0.25, 0.5, 0.5, 0.75, -3.5, 1e-30, 7.0, -0.0], dtype=np.float32)
    corpus = _random_corpus(rng, shards=4, values=values)
    kept, _ = _select(tmp_path, corpus, ratio)
    assert kept == _brute_force(corpus, ratio)


def test_global_keep_with_distinct_scores_in_one_bin(tmp_path: Path):
    """Scores that share the high 16 bits: the low-bits pass must split them exactly."""
    values = [float(np.float32(0.5) + np.float32(i) * np.float32(1e-7)) for i in range(40)]
    corpus = [[(values[:20], [False] + [True] * 19)], [(values[20:], [True] * 20)]]
    assert len({int(k) >> 16 for k in sortable_keys(np.array(values, np.float32))}) == 1
    kept, n_kept = _select(tmp_path, corpus, 0.3)
    assert kept == _brute_force(corpus, 0.3)
    assert sum(n_kept) == math.ceil(0.3 * 39)


def test_context_tokens_never_kept_and_ratio_one_keeps_every_target(tmp_path: Path):
    corpus = [[([9.0, 1.0, 2.0, 9.0], [False, True, True, False])], [([5.0, -1.0], [False, True])]]
    kept, _ = _select(tmp_path, corpus, 1.0)
    assert kept == [[[False, True, True, False]], [[False, True]]]


def test_corpus_without_trainable_tokens_keeps_nothing(tmp_path: Path):
    corpus = [[([1.0, 2.0], [False, False])]]
    kept, n_kept = _select(tmp_path, corpus, 0.6)
    assert kept == [[[False, False]]] and n_kept == [0]


def test_mismatched_shards_are_refused(tmp_path: Path):
    score_path, _ = _write_pair(tmp_path / "a", 0, [([1.0, 2.0], [False, True])])
    _, other_tokenized = _write_pair(tmp_path / "b", 0, [([1.0, 2.0, 3.0], [False, True, True])])
    with pytest.raises(UserError, match="signal lengths differ"):
        gs.high_histogram(score_path, other_tokenized, _raw_rel(0.5))


def test_locate_threshold_walks_from_the_top():
    high = np.zeros(gs.BINS, dtype=np.int64)
    high[[10, 500, 65535]] = [4, 3, 2]
    assert gs.locate_threshold_bin(high, 1) == (65535, 0)
    assert gs.locate_threshold_bin(high, 3) == (500, 2)
    assert gs.locate_threshold_bin(high, 9) == (10, 5)
    with pytest.raises(UserError):
        gs.locate_threshold_bin(high, 10)
    low = np.zeros(gs.BINS, dtype=np.int64)
    low[[7, 9]] = [2, 1]
    threshold = gs.locate_threshold(500, 2, low, 4)  # 2 above the bin, then low 9 (1), then low 7 (2)
    assert threshold == gs.Threshold(key=(500 << 16) | 7, greater=3, ties_to_keep=1)
    assert gs.tie_quotas([0, 2, 5], 3) == [0, 2, 1]
