"""`sstoken select --method loss|confidence|entropy` on the session's really scored corpus: no model runs, the keep
masks are the hand sort of the stored nll_cur / entropy_cur; scores written before entropy_cur still select and
validate, and entropy over them is refused by name."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.runtime.files import read_manifest, verify_shards
from pipeline.scoring import scorer as scorer_module
from pipeline.selection.keep_tables import flat_values
from pipeline.validation.validate_stage import ValidateConfig, run_validate
from tests.score_factories import as_written_before


@pytest.fixture
def no_model(monkeypatch):
    """Building a Scorer (loading a model) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(scorer_module.Scorer, "__init__", refuse)


def _rows(scores: Path, data: Path) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
    """(shard, row, trainable, nll_cur, entropy_cur) of every sample, in shard then row order."""
    out = []
    for shard, entry in enumerate(read_manifest(scores, kind="scores")["shards"]):
        table = pq.read_table(scores / entry["file"])
        trainable = pq.read_table(data / entry["file"], columns=["trainable"]).column("trainable").to_pylist()
        for row in range(table.num_rows):
            out.append((shard, row, np.array(trainable[row], bool),
                        np.array(table.column("nll_cur")[row].as_py(), np.float64),
                        np.array(table.column("entropy_cur")[row].as_py(), np.float64)))
    return out


def _by_hand(rows: list, method: str, ratio: float, granularity: str, min_prob: float | None) -> dict:
    """{(shard, row): keep}: targets sorted by the ranked value (descending; confidence: -nll_cur), then shard, row,
    position; the top ceil(ratio * n) of each sample or of the corpus; with min_prob, less exp(-nll_cur) < min_prob."""
    groups: dict = {}
    for shard, row, trainable, nll, entropy in rows:
        value = {"loss": nll, "confidence": -nll, "entropy": entropy}[method].astype(np.float32)
        key = (shard, row) if granularity == "sample" else "corpus"
        groups.setdefault(key, []).extend((-float(value[p]), shard, row, p) for p in np.flatnonzero(trainable))
    keep = {(shard, row): np.zeros(len(trainable), bool) for shard, row, trainable, _, _ in rows}
    nll_of = {(shard, row): nll for shard, row, _, nll, _ in rows}
    for candidates in groups.values():
        candidates.sort()
        for _, shard, row, position in candidates[: math.ceil(round(ratio * len(candidates), 9))]:
            if min_prob is None or math.log(min_prob) <= float(np.float32(-nll_of[shard, row][position])):
                keep[shard, row][position] = True
    return keep


def _kept(scores: Path) -> dict:
    out = {}
    for shard, entry in enumerate(read_manifest(scores, kind="scores")["shards"]):
        for row, keep in enumerate(pq.read_table(scores / entry["file"]).column("keep").to_pylist()):
            out[shard, row] = np.array(keep, bool)
    return out


@pytest.mark.parametrize(
    ("method", "granularity", "min_prob"),
    [("loss", "sample", None), ("loss", "global", None), ("confidence", "sample", None),
     ("confidence", "global", "median"), ("entropy", "sample", None), ("entropy", "global", None)],
)
def test_select_ranks_the_stored_current_signal(scored_corpus, tmp_path, no_model, method, granularity, min_prob):
    folder = scored_corpus.copy_scores(tmp_path / "scores")
    rows = _rows(folder, scored_corpus.data)
    if min_prob == "median":  # a threshold that drops part of the ratio's top: the corpus' median probability
        min_prob = float(np.exp(-np.median(np.concatenate([nll[t] for _, _, t, nll, _ in rows]))))
    flags = ["--min-prob", str(min_prob)] if min_prob is not None else []
    assert main(["select", "--scores", str(folder), "--method", method, "--ratio", "0.4", "--granularity",
                 granularity, *flags]) == 0
    manifest = read_manifest(folder, kind="scores")
    verify_shards(folder, manifest)
    assert manifest["selection"]["method"] == method and manifest["selection"].get("min_prob") == min_prob
    expected = _by_hand(rows, method, 0.4, granularity, min_prob)
    got = _kept(folder)
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=str(key))
    assert manifest["counts"]["kept"] == sum(int(k.sum()) for k in got.values()) > 0


def _as_written_before_entropy(folder: Path) -> Path:
    """The scores folder as `sstoken score` wrote it before entropy_cur existed (and weights and |V|): shards without
    the columns, no `entropy` nor `vocab_size` among its signals, every checksum resealed."""
    return as_written_before(folder, ("entropy_cur", "weight"), ("entropy", "vocab_size"))


def test_scores_written_before_entropy_cur_still_select_and_validate(scored_corpus, tmp_path, no_model, capsys):
    old = _as_written_before_entropy(scored_corpus.copy_scores(tmp_path / "old"))
    new = scored_corpus.copy_scores(tmp_path / "new")
    for folder in (old, new):
        assert main(["select", "--scores", str(folder), "--method", "loss", "--ratio", "0.3"]) == 0
    for entry in read_manifest(old, kind="scores")["shards"]:
        before, after = pq.read_table(old / entry["file"]), pq.read_table(new / entry["file"])
        assert "entropy_cur" not in before.column_names  # rewritten in its own layout
        for name in ("keep", "n_kept"):
            assert before.column(name).equals(after.column(name))
        np.testing.assert_array_equal(flat_values(before.column("score")), flat_values(after.column("score")))
    assert main(["select", "--scores", str(old), "--output", str(tmp_path / "masks"), "--method", "sstoken"]) == 0
    summary = run_validate(ValidateConfig(folder=old))
    assert summary.counts["problems"] == 0, summary.details

    capsys.readouterr()
    assert main(["select", "--scores", str(old), "--method", "entropy"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sstoken select: error: method entropy ranks entropy_cur, which ") and len(err.splitlines()) == 1
    assert "lacks" in err and "rescore the corpus with `sstoken score`" in err
