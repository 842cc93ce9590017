"""loss, confidence and entropy: the current model's stored signals ranked as they are, per sample and corpus-wide,
against hand computations on literal signals; and the refusal of scores written before entropy_cur existed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import shard_name
from pipeline.runtime.schemas import table_from_rows, validate_table
from pipeline.scoring.score_settings import SignalSet, signals_to_compute
from pipeline.selection.keep_tables import flat_values
from pipeline.selection.methods import sample_keep, sample_score
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection_shards import SelectShard, apply_selection, plan_selection

NAN = np.nan
TRAINABLE = np.array([False, False, True, True, True, False, True])
NLL = np.array([NAN, NAN, 2.0, 0.1, 0.7, NAN, 1.2], dtype=np.float32)  # P = 0.135, 0.905, 0.497, 0.301
ENTROPY = np.array([NAN, NAN, 0.3, 2.5, 1.0, NAN, 2.5], dtype=np.float32)  # a tie at positions 3 and 6
NONE = np.full(len(NLL), NAN, dtype=np.float32)  # rel, attn: not used by these methods


def _score(**settings) -> np.ndarray:
    return sample_score("s", NONE, NONE, TRAINABLE, SelectSettings(**settings), nll_cur=NLL, entropy_cur=ENTROPY)


def _keep(**settings) -> list[int]:
    return np.flatnonzero(sample_keep(_score(**settings), TRAINABLE, SelectSettings(**settings))).tolist()


def test_loss_keeps_the_highest_current_nll():
    np.testing.assert_array_equal(_score(method="loss")[TRAINABLE], NLL[TRAINABLE])
    assert np.isnan(_score(method="loss")[~TRAINABLE]).all()
    assert _keep(method="loss", ratio=0.5) == [2, 6]  # 2.0, 1.2
    assert _keep(method="loss", ratio=0.6) == [2, 4, 6]  # ceil(0.6 * 4) = 3


def test_confidence_keeps_the_lowest_current_nll_the_most_probable():
    np.testing.assert_array_equal(_score(method="confidence")[TRAINABLE], -NLL[TRAINABLE])  # log P
    assert _keep(method="confidence", ratio=0.5) == [3, 4]  # 0.1, 0.7
    assert _keep(method="confidence", ratio=0.25) == [3]


@pytest.mark.parametrize(
    ("ratio", "min_prob", "kept"),
    [
        (1.0, 0.5, [3]),  # ratio 1: exactly the targets with P >= 0.5 (0.905; 0.497 falls short)
        (1.0, 0.3, [3, 4, 6]),  # 0.905, 0.497, 0.301
        (0.5, 0.3, [3, 4]),  # the ratio caps: its top 2 (3, 4) both pass
        (0.75, 0.4, [3, 4]),  # top 3 is 3, 4, 6; 6 (0.301) is dropped by the threshold
        (1.0, 0.95, []),  # none is that probable
    ],
)
def test_confidence_min_prob_drops_the_improbable_from_the_ratio_top(ratio, min_prob, kept):
    by_hand = [
        i for i in np.flatnonzero(TRAINABLE)
        if i in _keep(method="confidence", ratio=ratio) and math.exp(-float(NLL[i])) >= min_prob
    ]
    assert _keep(method="confidence", ratio=ratio, min_prob=min_prob) == by_hand == kept


def test_entropy_keeps_the_highest_entropy_ties_to_the_earlier_position():
    np.testing.assert_array_equal(_score(method="entropy")[TRAINABLE], ENTROPY[TRAINABLE])
    assert _keep(method="entropy", ratio=0.5) == [3, 6]
    assert _keep(method="entropy", ratio=0.25) == [3]  # 3 and 6 tie: the earlier wins
    assert _keep(method="entropy", ratio=0.75) == [3, 4, 6]


def test_a_missing_entropy_is_refused_by_name():
    with pytest.raises(UserError, match=r"entropy_cur is NaN at 4 of 4 targets.*--signals needed"):
        sample_score("x", NONE, NONE, TRAINABLE, SelectSettings(method="entropy"), nll_cur=NLL, entropy_cur=NONE)
    with pytest.raises(UserError, match=r"nll_cur is NaN at 1 of 4 targets \(first at position 4\).*NaN losses"):
        broken = NLL.copy()
        broken[4] = NAN
        sample_score("x", NONE, NONE, TRAINABLE, SelectSettings(method="loss"), nll_cur=broken)
    # Neither REL nor attention is read: NaN there is no concern of theirs.
    for method in ("loss", "confidence", "entropy"):
        settings = SelectSettings(method=method)
        assert not (settings.uses_rel or settings.uses_attention) and settings.uses_entropy == (method == "entropy")


def test_settings_min_prob_is_for_confidence_and_in_its_key():
    with pytest.raises(ValidationError, match="min_prob is for method confidence only, not method loss"):
        SelectSettings(method="loss", min_prob=0.5)
    for bad in (0.0, 1.5):
        with pytest.raises(ValidationError, match="min_prob"):
            SelectSettings(method="confidence", min_prob=bad)
    assert SelectSettings(method="confidence", min_prob=0.25).selection_key() == {
        "method": "confidence", "ratio": 0.6, "granularity": "sample", "min_prob": 0.25
    }
    assert SelectSettings(method="entropy").selection_key() == {"method": "entropy", "ratio": 0.6, "granularity": "sample"}


def test_signals_needed_runs_no_history_and_no_attention_for_them():
    """Only the current pass: entropy_cur for entropy (from logits that pass computes anyway); nothing else."""
    assert signals_to_compute("needed", SelectSettings(method="loss")) == SignalSet(rel=False, attention=False, entropy=False)
    assert signals_to_compute("needed", SelectSettings(method="confidence")) == SignalSet(False, False, False)
    assert signals_to_compute("needed", SelectSettings(method="entropy")) == SignalSet(False, False, True)
    assert signals_to_compute("needed", SelectSettings()) == SignalSet(True, True, False)
    assert signals_to_compute("all", SelectSettings(method="loss")) == SignalSet(True, True, True)


# -- corpus-wide (granularity global), through the select step's own code --------------------------


def _write_corpus(root: Path, corpus: list[list[tuple[list[float], list[float], list[bool]]]], entropy: bool = True
                  ) -> list[SelectShard]:
    """Score shards (nll_cur, entropy_cur; without `entropy`, as written before entropy_cur existed) and their
    tokenized shards; masks go apart to `root/masks`."""
    shards = []
    (root / "masks" / "_progress").mkdir(parents=True, exist_ok=True)  # what the stage runner makes
    for index, samples in enumerate(corpus):
        scores, tokenized = [], []
        for row, (nll, ent, trainable) in enumerate(samples):
            n, sample_id = len(nll), f"s{index}-{row}"
            tokenized.append({"sample_id": sample_id, "source": "t", "input_ids": list(range(n)), "trainable": trainable,
                              "n_tokens": n, "n_trainable": sum(trainable), "n_turns": 1, "truncated": False})
            nan = [NAN] * n
            scores.append({"sample_id": sample_id, "nll_cur": nll, "nll_hist": nan, "rel": nan, "attn": nan,
                           **({"entropy_cur": ent} if entropy else {}), "score": nan, "keep": [False] * n,
                           "n_tokens": n, "n_trainable": sum(trainable), "n_kept": 0})
        for name, rows in (("scores", scores), ("tokenized", tokenized)):
            (root / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(table_from_rows(rows, name), root / name / shard_name(index))
        shards.append(SelectShard(shard_name(index), str(root / "scores"), str(root / "tokenized" / shard_name(index)),
                                  str(root / "masks")))
    return shards


def _random_corpus(seed: int) -> list:
    """Values from a small set, so ties across samples and shards are common; NaN off the targets."""
    rng = np.random.default_rng(seed)
    corpus = []
    for _ in range(3):
        samples = []
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(2, 12))
            trainable = [False] + [bool(b) for b in rng.random(n - 1) < 0.7]
            nll = [float(v) if t else NAN for v, t in zip(rng.choice([0.05, 0.3, 0.9, 2.0, 4.0], n), trainable)]
            ent = [float(v) if t else NAN for v, t in zip(rng.choice([0.5, 1.5, 3.0], n), trainable)]
            samples.append((nll, ent, trainable))
        corpus.append(samples)
    return corpus


def _by_hand(corpus: list, method: str, ratio: float, min_prob: float | None) -> list[list[list[bool]]]:
    """Every target of the corpus sorted at once by the ranked value (descending), then shard, row, position;
    the top ceil(ratio * n); confidence with min_prob: less those with exp(-nll) < min_prob."""
    candidates = []
    for shard, samples in enumerate(corpus):
        for row, (nll, ent, trainable) in enumerate(samples):
            for position, target in enumerate(trainable):
                if target:
                    value = {"loss": nll[position], "confidence": -nll[position], "entropy": ent[position]}[method]
                    candidates.append((-value, shard, row, position))
    candidates.sort()
    keep = [[[False] * len(t) for _, _, t in samples] for samples in corpus]
    for _, shard, row, position in candidates[: math.ceil(round(ratio * len(candidates), 9))]:
        if min_prob is None or math.exp(-corpus[shard][row][0][position]) >= min_prob:
            keep[shard][row][position] = True
    return keep


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize(
    ("method", "ratio", "min_prob"),
    [("loss", 0.3, None), ("confidence", 0.45, None), ("confidence", 0.8, 0.5), ("entropy", 0.35, None),
     ("entropy", 1.0, None)],
)
def test_global_selection_equals_the_hand_sort(tmp_path, seed, method, ratio, min_prob):
    corpus = _random_corpus(seed)
    shards = _write_corpus(tmp_path, corpus)
    settings = SelectSettings(method=method, ratio=ratio, granularity="global", min_prob=min_prob)
    outcome = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False))
    expected = _by_hand(corpus, method, ratio, min_prob)
    kept = [pq.read_table(tmp_path / "masks" / s.file).column("keep").to_pylist() for s in shards]
    assert kept == expected
    targets = sum(sum(t) for samples in corpus for _, _, t in samples)
    assert outcome.selection["k"] == math.ceil(round(ratio * targets, 9))
    assert outcome.selection["method"] == method and outcome.selection.get("min_prob") == min_prob


@pytest.mark.parametrize("method", ["loss", "confidence", "entropy"])
def test_per_sample_selection_through_the_select_step_equals_the_hand_sort_per_sample(tmp_path, method):
    corpus = _random_corpus(7)
    shards = _write_corpus(tmp_path, corpus)
    apply_selection(shards, plan_selection(shards, SelectSettings(method=method, ratio=0.5), same_checkpoint=False))
    for shard, samples in zip(shards, corpus):
        kept = pq.read_table(tmp_path / "masks" / shard.file).column("keep").to_pylist()
        assert kept == [_by_hand([[sample]], method, 0.5, None)[0][0] for sample in samples]


def test_scores_written_before_entropy_cur_select_by_other_methods_and_refuse_entropy_by_name(tmp_path):
    corpus = _random_corpus(1)
    shards = _write_corpus(tmp_path, corpus, entropy=False)
    old = pq.read_table(tmp_path / "scores" / shards[0].file)
    assert "entropy_cur" not in old.column_names
    validate_table(old, "scores", source="old shard")  # an older shard still matches scores.v1
    with pytest.raises(UserError) as caught:
        plan_selection(shards, SelectSettings(method="entropy"), same_checkpoint=False)
    message = str(caught.value)
    assert f"method entropy ranks entropy_cur, which {tmp_path / 'scores' / shards[0].file} lacks" in message
    assert "rescore the corpus with `sstoken score`" in message and len(message.splitlines()) == 1
    assert not any((tmp_path / "masks").rglob("*.parquet"))  # refused before anything was written
    apply_selection(shards, plan_selection(shards, SelectSettings(method="loss", ratio=0.5), same_checkpoint=False))
    masks = pq.read_table(tmp_path / "masks" / shards[0].file)
    assert flat_values(masks.column("keep")).sum() > 0
