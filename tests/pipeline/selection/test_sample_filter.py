"""The sample filter of a two-level selection (`sample_ratio`, `sample_by`): roll-ups, the corpus-wide cut with its
sample-id tie-break, the token selection within the kept samples (per sample and global), the counts, and the
refusals; on literal signals against hand computations."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import shard_name
from pipeline.runtime.schemas import table_from_rows
from pipeline.runtime.stage_output import commit_shard
from pipeline.selection.sample_rollups import SampleCut, filter_summary, find_cut, rollup_means, stays
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection_shards import SelectShard, apply_selection, plan_selection

NAN = math.nan

# Two shards, five samples: (sample_id, source, trainable, nll_cur, entropy_cur).
# Mean entropy: s0-0 1.5, s0-1 0.3, s1-0 3.0, s1-1 1.5, s1-2 0.1 (s0-0 and s1-1 tie).
# Mean nll:     s0-0 2.0, s0-1 0.5, s1-0 3.0, s1-1 0.2, s1-2 1.0.
CORPUS = [
    [("s0-0", "web", [False, True, True, False], [NAN, 1.0, 3.0, NAN], [NAN, 2.0, 1.0, NAN]),
     ("s0-1", "web", [False, True, True, True], [NAN, 0.5, 0.5, 0.5], [NAN, 0.2, 0.4, 0.3])],
    [("s1-0", "web", [False, True, True], [NAN, 2.0, 4.0], [NAN, 3.0, 3.0]),
     ("s1-1", "code", [False, True, False, True], [NAN, 0.1, NAN, 0.3], [NAN, 1.5, NAN, 1.5]),
     ("s1-2", "code", [False, True], [NAN, 1.0], [NAN, 0.1])],
]


def write_corpus(root: Path, corpus: list = CORPUS, entropy: bool = True, output: bool = True) -> list[SelectShard]:
    """Score shards (nll_cur, entropy_cur; rel and attn NaN) and their tokenized shards under `root`; with `output`
    the selection goes apart to `root/masks`, else in place."""
    shards = []
    (root / "masks" / "_progress").mkdir(parents=True, exist_ok=True)  # what the stage runner makes
    for index, samples in enumerate(corpus):
        scores, tokenized = [], []
        for sample_id, source, trainable, nll, ent in samples:
            n = len(nll)
            tokenized.append({"sample_id": sample_id, "source": source, "input_ids": list(range(n)),
                              "trainable": trainable, "n_tokens": n, "n_trainable": sum(trainable), "n_turns": 1,
                              "truncated": False})
            scores.append({"sample_id": sample_id, "nll_cur": nll, "nll_hist": [NAN] * n, "rel": [NAN] * n,
                           "attn": [NAN] * n, **({"entropy_cur": ent} if entropy else {}), "score": [NAN] * n,
                           "keep": [False] * n, "n_tokens": n, "n_trainable": sum(trainable), "n_kept": 0})
        for name, rows in (("scores", scores), ("tokenized", tokenized)):
            (root / name).mkdir(parents=True, exist_ok=True)
            pq.write_table(table_from_rows(rows, name), root / name / shard_name(index))
        shards.append(SelectShard(shard_name(index), str(root / "scores"), str(root / "tokenized" / shard_name(index)),
                                  str(root / "masks") if output else None))
    return shards


def selected(root: Path, shards: list[SelectShard], column: str = "keep") -> dict[str, list]:
    """sample_id -> the masks' `column`."""
    out = {}
    for shard in shards:
        table = pq.read_table(root / "masks" / shard.file)
        out.update(zip(table.column("sample_id").to_pylist(), table.column(column).to_pylist()))
    return out


def test_rollup_means_average_over_the_targets_only():
    rows = [np.array([NAN, 1.0, 3.0, 9.0], np.float32), np.array([NAN, 5.0], np.float32)]
    masks = [np.array([False, True, True, False]), np.array([False, False])]
    means = rollup_means(rows, masks)
    assert means[0] == 2.0 and means[1] == -math.inf  # no target: ranks below every sample


@pytest.mark.parametrize(("ratio", "cut", "kept"), [
    (0.6, SampleCut(0.5, "c"), [True, True, True, False, False]),  # ceil(3.0) = 3: a, b, c
    (0.4, SampleCut(0.5, "b"), [False, True, True, False, False]),  # ceil(2.0) = 2: the tie b, c goes to b
    (0.5, SampleCut(0.5, "c"), [True, True, True, False, False]),  # ceil(2.5) = 3
    (1.0, SampleCut(-math.inf, "d"), [True] * 5),
])
def test_the_cut_keeps_the_highest_roll_ups_and_breaks_ties_by_sample_id(ratio, cut, kept):
    values = np.array([0.5, 0.9, 0.5, -math.inf, 0.2])
    ids = np.array(["c", "a", "b", "d", "e"])
    assert find_cut(values, ids, ratio) == cut
    assert stays(values, ids, cut).tolist() == kept
    assert find_cut(np.zeros(0), np.zeros(0, str), 0.5) is None


def test_the_summary_counts_add_up_per_source():
    summary = filter_summary(np.array([True, False, False, True]), np.array(["x", "x", "y", "y"]), np.array([3, 2, 5, 1]))
    assert summary == {
        "samples": 4, "kept": 2, "dropped": 2, "targets": 11, "kept_targets": 4, "dropped_targets": 7,
        "by_source": {"x": {"samples": 2, "kept": 1, "dropped": 1, "targets": 5, "kept_targets": 3, "dropped_targets": 2},
                      "y": {"samples": 2, "kept": 1, "dropped": 1, "targets": 6, "kept_targets": 1, "dropped_targets": 5}}}


# sample_by, sample_ratio, method -> the samples that stay, by hand from the means above.
STAYING = [
    ("entropy", 0.6, "loss", {"s1-0", "s0-0", "s1-1"}),  # 3.0, 1.5 (s0-0), 1.5 (s1-1)
    ("entropy", 0.4, "loss", {"s1-0", "s0-0"}),  # the 1.5 tie goes to s0-0, the smaller id
    ("loss", 0.4, "entropy", {"s1-0", "s0-0"}),  # mean nll 3.0, 2.0
    ("score", 0.4, "loss", {"s1-0", "s0-0"}),  # loss's score is nll_cur: as sample_by loss
    ("score", 0.4, "confidence", {"s1-1", "s0-1"}),  # confidence's score is -nll_cur: mean -0.2, -0.5
]


@pytest.mark.parametrize(("sample_by", "sample_ratio", "method", "staying"), STAYING)
def test_dropped_samples_keep_nothing_and_the_rest_select_per_sample(tmp_path, sample_by, sample_ratio, method, staying):
    shards = write_corpus(tmp_path)
    settings = SelectSettings(method=method, ratio=0.5, sample_ratio=sample_ratio, sample_by=sample_by)
    outcome = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False))
    keep, weight = selected(tmp_path, shards), selected(tmp_path, shards, "weight")
    ranked = {"loss": 3, "confidence": 3, "entropy": 4}[method]  # the column the method ranks
    for samples in CORPUS:
        for sample in samples:
            sample_id, trainable, values = sample[0], sample[2], sample[ranked]
            expected = [False] * len(trainable)
            if sample_id in staying:  # top ceil(0.5 * n) of its targets, ties to the earlier position
                order = sorted((-(values[p] if method != "confidence" else -values[p]), p)
                               for p, t in enumerate(trainable) if t)
                for _, position in order[: math.ceil(0.5 * sum(trainable))]:
                    expected[position] = True
            assert keep[sample_id] == expected, sample_id
            assert weight[sample_id] == [float(k) for k in expected]
    summary = outcome.selection["samples"]
    assert summary["kept"] == len(staying) and summary["kept"] + summary["dropped"] == summary["samples"] == 5
    assert summary["kept_targets"] + summary["dropped_targets"] == summary["targets"] == 10
    assert outcome.selection["sample_ratio"] == sample_ratio and outcome.selection["sample_by"] == sample_by


def test_literal_per_sample_and_global_keeps_and_counts(tmp_path):
    """sample_by entropy 0.6 keeps s1-0, s0-0, s1-1 (6 targets); loss at ratio 0.5 then keeps, by hand:"""
    per_sample = {"s0-0": [False, False, True, False], "s0-1": [False] * 4, "s1-0": [False, False, True],
                  "s1-1": [False, False, False, True], "s1-2": [False, False]}
    # global: k = ceil(0.5 * 6) = 3 of the kept samples' nll 1.0, 3.0 | 2.0, 4.0 | 0.1, 0.3: 4.0, 3.0, 2.0
    corpus_wide = {"s0-0": [False, False, True, False], "s0-1": [False] * 4, "s1-0": [False, True, True],
                   "s1-1": [False] * 4, "s1-2": [False, False]}
    for granularity, expected in (("sample", per_sample), ("global", corpus_wide)):
        root = tmp_path / granularity
        shards = write_corpus(root)
        settings = SelectSettings(method="loss", ratio=0.5, granularity=granularity, sample_ratio=0.6, sample_by="entropy")
        outcome = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False))
        assert selected(root, shards) == expected
        assert outcome.selection["sample_cut"] == {"value": 1.5, "sample_id": "s1-1"}
        assert outcome.selection["samples"] == {
            "samples": 5, "kept": 3, "dropped": 2, "targets": 10, "kept_targets": 6, "dropped_targets": 4,
            "by_source": {"code": {"samples": 2, "kept": 1, "dropped": 1, "targets": 3, "kept_targets": 2,
                                   "dropped_targets": 1},
                          "web": {"samples": 3, "kept": 2, "dropped": 1, "targets": 7, "kept_targets": 4,
                                  "dropped_targets": 3}}}
        if granularity == "global":
            assert outcome.selection["k"] == 3
        # the scores are the method's at every target, the dropped samples' too
        scores = selected(root, shards, "score")
        assert scores["s1-2"][1] == pytest.approx(1.0) and scores["s0-1"][1:] == pytest.approx([0.5] * 3)


def test_in_place_equals_apart(tmp_path):
    settings = SelectSettings(method="entropy", ratio=0.5, granularity="global", sample_ratio=0.4, sample_by="loss")
    apart = write_corpus(tmp_path / "apart")
    apply_selection(apart, plan_selection(apart, settings, same_checkpoint=False))
    in_place = write_corpus(tmp_path / "in-place", output=False)
    (tmp_path / "in-place" / "scores" / "_progress").mkdir()
    for shard in in_place:  # what `sstoken score` leaves: a progress record per shard
        commit_shard(shard.target_folder, shard.file, pq.read_table(shard.path), {"run_key": "k"})
    apply_selection(in_place, plan_selection(in_place, settings, same_checkpoint=False))
    for a, b in zip(apart, in_place):
        masks, scores = pq.read_table(tmp_path / "apart" / "masks" / a.file), pq.read_table(b.path)
        for name in ("sample_id", "keep", "n_kept"):
            assert masks.column(name).equals(scores.column(name)), name


def test_a_rerun_with_the_same_filter_rewrites_nothing(tmp_path):
    shards = write_corpus(tmp_path)
    settings = SelectSettings(method="loss", ratio=0.5, sample_ratio=0.6, sample_by="entropy")
    first = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False))
    again = apply_selection(shards, plan_selection(shards, settings, same_checkpoint=False))
    assert first.rewritten == 2 and again.rewritten == 0


def test_settings_key_and_refusals():
    assert SelectSettings().selection_key() == {"method": "sstoken", "ratio": 0.6, "granularity": "sample", "gamma": 0.5,
                                                "normalise": "per_sample"}  # no filter: the key of before
    key = SelectSettings(method="loss", sample_ratio=0.5, sample_by="entropy").selection_key()
    assert key["sample_ratio"] == 0.5 and key["sample_by"] == "entropy"
    assert SelectSettings(method="loss", sample_ratio=0.5).within_shard().selection_key() == SelectSettings(
        method="loss").selection_key()
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValidationError, match="sample_ratio"):
            SelectSettings(sample_ratio=bad)
    with pytest.raises(ValidationError, match="sample_by"):
        SelectSettings(sample_ratio=0.5, sample_by="median")
    with pytest.raises(ValidationError, match="sample_by entropy ranks samples for the sample filter; set sample_ratio"):
        SelectSettings(sample_by="entropy")
    with pytest.raises(ValidationError, match="method full scores every target 1"):
        SelectSettings(method="full", sample_ratio=0.5)


def test_signals_needed_store_what_the_roll_up_averages():
    from pipeline.scoring.score_settings import SignalSet, signals_to_compute

    needed = [signals_to_compute("needed", SelectSettings(method="loss", sample_ratio=0.5, sample_by=by))
              for by in ("rel", "entropy", "loss", "score")]
    assert needed == [SignalSet(True, False, False), SignalSet(False, False, True), SignalSet(False, False, False),
                      SignalSet(False, False, False)]


def test_a_roll_up_needing_a_column_the_folder_lacks_is_refused_by_name(tmp_path):
    shards = write_corpus(tmp_path, entropy=False)
    settings = SelectSettings(method="loss", sample_ratio=0.5, sample_by="entropy")
    with pytest.raises(UserError, match=r"sample_by entropy averages entropy_cur, which .*part-00000.parquet lacks"):
        plan_selection(shards, settings, same_checkpoint=False)
    # REL not stored (NaN at every target) and REL of one checkpoint: refused, naming the roll-up
    with pytest.raises(UserError, match="sample_by rel averages rel over every target: sample 's0-0': rel is NaN"):
        plan_selection(shards, SelectSettings(method="loss", sample_ratio=0.5, sample_by="rel"), same_checkpoint=False)
    with pytest.raises(UserError, match="sample_by rel ranks samples by their mean REL, but current and history are"):
        plan_selection(shards, SelectSettings(method="loss", sample_ratio=0.5, sample_by="rel"), same_checkpoint=True)
    assert not any((tmp_path / "masks").glob("*.parquet"))  # refused before anything was written


# -- `sstoken select` and `sstoken score` on the session's really scored corpus -----------------------------------


def _keep_columns(folder: Path) -> list:
    from pipeline.runtime.files import read_manifest

    return [pq.read_table(folder / entry["file"], columns=["sample_id", "keep", "n_kept"])
            for entry in read_manifest(folder)["shards"]]


@pytest.mark.parametrize("granularity", ["sample", "global"])
def test_select_in_place_and_apart_drop_the_same_samples_and_count_them(scored_corpus, tmp_path, capsys, granularity):
    from pipeline.cli import main
    from pipeline.runtime.files import read_manifest
    from pipeline.validation.validate_stage import ValidateConfig, run_validate

    flags = ["--method", "sstoken", "--ratio", "0.5", "--granularity", granularity, "--sample-ratio", "0.5",
             "--sample-by", "entropy"]
    folder = scored_corpus.copy_scores(tmp_path / "scores")
    assert main(["select", "--scores", str(folder), *flags]) == 0
    shown = capsys.readouterr().out
    assert main(["select", "--scores", str(scored_corpus.scores), "--output", str(tmp_path / "masks"), *flags]) == 0
    for in_place, apart in zip(_keep_columns(folder), _keep_columns(tmp_path / "masks")):
        assert in_place.equals(apart)
    manifest = read_manifest(folder, kind="scores")
    samples = manifest["selection"]["samples"]
    # by hand: the mean entropy_cur of every sample, highest first, ties by id; ceil(0.5 * n) stay
    means = {}
    for entry in manifest["shards"]:
        scores = pq.read_table(folder / entry["file"])
        trainable = pq.read_table(scored_corpus.data / entry["file"], columns=["trainable"]).column(0).to_pylist()
        for sample_id, ent, mask in zip(scores.column("sample_id").to_pylist(), scores.column("entropy_cur").to_pylist(),
                                        trainable):
            means[sample_id] = np.mean([e for e, t in zip(ent, mask) if t]) if any(mask) else -math.inf
    ranked = sorted(means, key=lambda s: (-means[s], s))
    staying = set(ranked[: math.ceil(0.5 * len(ranked))])
    kept = {sid: n for table in _keep_columns(folder) for sid, n in zip(table.column("sample_id").to_pylist(),
                                                                          table.column("n_kept").to_pylist())}
    assert {sid for sid, n in kept.items() if n} <= staying and all(kept[sid] > 0 for sid in staying)
    assert samples["kept"] == len(staying) and samples["kept"] + samples["dropped"] == samples["samples"] == len(means)
    counts = manifest["counts"]
    assert (counts["samples_kept"], counts["samples_dropped"]) == (samples["kept"], samples["dropped"])
    assert "samples dropped" in shown and "samples kept" in shown
    assert run_validate(ValidateConfig(folder=folder)).counts["problems"] == 0
    # without the filter again: its counts leave the manifest
    assert main(["select", "--scores", str(folder), "--method", "sstoken"]) == 0
    manifest = read_manifest(folder, kind="scores")
    assert "samples" not in manifest["selection"] and "samples_dropped" not in manifest["counts"]


def test_score_with_a_sample_filter_equals_select_with_it(scored_corpus, tmp_path):
    """The score stage's own select step applies the filter; its shards equal a re-selection of the same settings."""
    from pipeline.cli import main
    from pipeline.scoring.score_stage import run_score_job

    scored = scored_corpus.copy_scores(tmp_path / "scored", cache=True)
    config = scored_corpus.config.model_copy(update={
        "output": scored, "history_cache": tmp_path / "scored-cache", "sample_ratio": 0.5, "sample_by": "loss"})
    summary = run_score_job(config)
    assert summary.counts["shards_scored"] == 0 and summary.counts["samples_dropped"] > 0
    reselected = scored_corpus.copy_scores(tmp_path / "reselected")
    assert main(["select", "--scores", str(reselected), "--sample-ratio", "0.5", "--sample-by", "loss"]) == 0
    for a, b in zip(_keep_columns(scored), _keep_columns(reselected)):
        assert a.equals(b)


@pytest.mark.parametrize(("flags", "message"), [
    (["--sample-ratio", "0"], "sample_ratio"),
    (["--sample-ratio", "1.5"], "sample_ratio"),
    (["--sample-by", "rel"], "sample_by rel ranks samples for the sample filter; set sample_ratio below 1"),
    (["--method", "full", "--sample-ratio", "0.5"], "method full scores every target 1"),
])
def test_bad_sample_filter_flags_are_one_line_and_exit_2(scored_corpus, tmp_path, capsys, flags, message):
    from pipeline.cli import main

    assert main(["select", "--scores", str(scored_corpus.scores), "--output", str(tmp_path / "m"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_an_unknown_roll_up_is_refused_by_the_parser(scored_corpus, tmp_path, capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["select", "--scores", str(scored_corpus.scores), "--sample-ratio", "0.5", "--sample-by", "median"])
    assert exited.value.code == 2 and "--sample-by: invalid choice: 'median'" in capsys.readouterr().err


def test_entropy_roll_up_over_scores_without_entropy_cur_is_refused_by_name(scored_corpus, tmp_path, capsys):
    from pipeline.cli import main
    from tests.pipeline.selection.test_select_current_signals import _as_written_before_entropy

    old = _as_written_before_entropy(scored_corpus.copy_scores(tmp_path / "old"))
    assert main(["select", "--scores", str(old), "--method", "loss", "--sample-ratio", "0.5", "--sample-by", "entropy"]) == 2
    err = capsys.readouterr().err.strip()
    assert "sample_by entropy averages entropy_cur, which " in err and "lacks" in err and len(err.splitlines()) == 1
