"""The stats API: tokens, samples, sources and rounds joined by sample_id, on literal token lists and synthetic folders."""

from __future__ import annotations

import json
import math
import re

import polars as pl
import pyarrow as pa
import pytest

from pipeline.runtime.files import ArtifactError, base_manifest, write_manifest, write_parquet_atomic
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.schemas import arrow_schema, table_from_rows
from pipeline.views.run_stats import open_stats, train_curves
from pipeline.views.stats import open_masks_folder, pick_samples, sample_rollups
from tests.score_factories import as_written_before, write_synthetic_run, write_synthetic_scores, write_synthetic_tokenized

NAN = float("nan")


def literal_folders(tmp_path, ids: tuple[str, str] = ("a", "b"), source: str = "src-", entropy: dict | None = None):
    """Two samples with literal tokens: a (5 tokens, targets 2..4) and b (4 tokens, targets 1 and 3); `ids` and
    `source` (a prefix of each id) name them otherwise; `entropy`: each id's entropy_cur (default: the score + 1 at the
    targets)."""
    tokenized, scores = tmp_path / "tokenized", tmp_path / "scores"
    tokenized.mkdir()
    scores.mkdir()
    first, second = ids
    rows = {first: ([10, 11, 12, 13, 14], [False, False, True, True, True]), second: ([20, 21, 22, 23], [False, True, False, True])}
    table = pa.Table.from_pylist([
        {"sample_id": sid, "source": source + sid, "input_ids": ids, "trainable": t, "n_tokens": len(ids),
         "n_trainable": sum(t), "n_turns": 1, "truncated": False} for sid, (ids, t) in rows.items()
    ], schema=arrow_schema("tokenized"))
    digest = write_parquet_atomic(table, tokenized / "part-00000.parquet")
    shards = [{"file": "part-00000.parquet", "rows": 2, "sha256": digest}]
    tokenizer = {"name_or_path": str(tmp_path / "no-tokenizer"), "fingerprint": "t", "chat_template_fingerprint": "c"}
    write_manifest(tokenized, base_manifest("tokenized", {}) | {"tokenizer": tokenizer, "shards": shards, "counts": {},
                                                                 "data_fingerprint": sha256_json([["part-00000.parquet", digest]])})
    score = {first: [NAN, NAN, 0.9, 0.1, 0.5], second: [NAN, 0.2, NAN, 0.8]}
    keep = {first: [False, False, True, False, True], second: [False, False, False, True]}
    rel = {first: [NAN, NAN, 1.0, -1.0, 0.0], second: [NAN, 0.5, NAN, 2.0]}
    signal_rows = []
    for sid, (ids, trainable) in rows.items():
        signal_rows.append({"sample_id": sid, "nll_cur": [v if math.isnan(v) else 1.0 for v in score[sid]],
                            "nll_hist": [v if math.isnan(v) else 2.0 for v in score[sid]], "rel": rel[sid],
                            "attn": [v if math.isnan(v) else 0.25 for v in score[sid]],
                            "entropy_cur": entropy[sid] if entropy else [v if math.isnan(v) else v + 1.0 for v in score[sid]],
                            "score": score[sid], "keep": keep[sid], "weight": [float(k) for k in keep[sid]],
                            "n_tokens": len(ids), "n_trainable": sum(trainable), "n_kept": sum(keep[sid])})
    digest = write_parquet_atomic(table_from_rows(signal_rows, "scores"), scores / "part-00000.parquet")
    key = sha256_json([[s["file"], s["sha256"]] for s in shards])
    write_manifest(scores, base_manifest("scores", {}) | {
        "tokenizer": tokenizer, "inputs": [{"kind": "tokenized", "path": str(tokenized), "data_fingerprint": key}],
        "selection": {"method": "sstoken", "granularity": "sample"},
        "shards": [{"file": "part-00000.parquet", "rows": 2, "sha256": digest}],
        "counts": {"shards": 1, "samples": 2, "tokens": 9, "trainable": 5, "kept": 3}})
    return tokenized, scores


def test_tokens_are_joined_by_sample_id_position_by_position(tmp_path):
    _, scores = literal_folders(tmp_path)
    tokens = open_masks_folder(scores).tokens().sort("sample_id", "position").collect()
    a = tokens.filter(pl.col("sample_id") == "a")
    assert a["token_id"].to_list() == [10, 11, 12, 13, 14]
    assert a["position"].to_list() == [0, 1, 2, 3, 4]
    assert a["keep"].to_list() == [False, False, True, False, True]
    assert a["score"].to_list()[2:] == pytest.approx([0.9, 0.1, 0.5])
    assert a["source"].unique().to_list() == ["src-a"] and a["round"].unique().to_list() == [0]
    # (k + 0.5) / targets over the targets only; context tokens have none.
    assert a["response_position"].to_list() == [None, None, pytest.approx(1 / 6), pytest.approx(0.5), pytest.approx(5 / 6)]
    b = tokens.filter(pl.col("sample_id") == "b")
    assert b["response_position"].to_list() == [None, 0.25, None, 0.75]
    assert list(tokens.columns) == ["sample_id", "source", "round", "position", "token_id", "trainable", "keep",
                                    "nll_cur", "nll_hist", "rel", "attn", "entropy_cur", "score", "response_position"]


def test_entropy_cur_is_a_signal_like_the_others_and_null_in_scores_written_before_it(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "old").mkdir()
    _, scores = literal_folders(tmp_path / "new")
    stats = open_masks_folder(scores)
    a = stats.tokens().filter(pl.col("sample_id") == "a").sort("position").collect()
    assert a["entropy_cur"].to_list()[2:] == pytest.approx([1.9, 1.1, 1.5])  # score + 1 at the targets
    assert all(math.isnan(v) for v in a["entropy_cur"].to_list()[:2])  # NaN off the targets, as stored
    samples = stats.samples().sort("sample_id").collect()
    assert samples["mean_entropy_cur"].to_list() == pytest.approx([(1.9 + 1.1 + 1.5) / 3, (1.2 + 1.8) / 2])

    _, old = literal_folders(tmp_path / "old")
    as_written_before(old, ("entropy_cur", "weight"))
    stats = open_masks_folder(old)
    tokens = stats.tokens().collect()
    assert tokens["entropy_cur"].null_count() == len(tokens) and tokens["nll_cur"].null_count() == 0
    assert stats.samples().collect()["mean_entropy_cur"].null_count() == 2


def test_samples_sources_and_rounds_count_targets_and_kept(tmp_path):
    _, scores = literal_folders(tmp_path)
    stats = open_masks_folder(scores)
    samples = stats.samples().collect()
    a = samples.row(0, named=True)
    assert (a["sample_id"], a["n_tokens"], a["n_trainable"], a["n_kept"]) == ("a", 5, 3, 2)
    assert a["kept_ratio"] == pytest.approx(2 / 3) and a["mean_score"] == pytest.approx(0.5)
    assert a["mean_rel"] == pytest.approx(0.0) and a["mean_nll_hist"] == pytest.approx(2.0)
    assert samples.row(1, named=True)["mean_score"] == pytest.approx(0.5)
    rounds = stats.rounds().collect().row(0, named=True)
    assert (rounds["samples"], rounds["tokens"], rounds["trainable"], rounds["kept"]) == (2, 9, 5, 3)
    assert stats.sources().collect()["source"].to_list() == ["src-a", "src-b"]


def test_sample_rollups_by_hand(tmp_path):
    entropy = {"a": [NAN, NAN, 0.3, 0.6, 1.2], "b": [NAN, 2.0, NAN, 1.0]}
    _, scores = literal_folders(tmp_path, entropy=entropy)
    rollups = sample_rollups(open_masks_folder(scores))
    assert rollups.columns == ["sample_id", "source", "targets", "kept", "kept_share", "mean_score", "mean_rel",
                               "mean_entropy", "mean_loss"]
    # a: score 0.9, 0.1, 0.5; rel 1, -1, 0; entropy 0.3, 0.6, 1.2; 2 of 3 kept. b: score 0.2, 0.8; rel 0.5, 2; 1 of 2.
    a, b = rollups.rows(named=True)
    assert (a["sample_id"], a["source"], a["targets"], a["kept"]) == ("a", "src-a", 3, 2)
    assert [a[k] for k in ("kept_share", "mean_score", "mean_rel", "mean_entropy", "mean_loss")] == pytest.approx(
        [2 / 3, 0.5, 0.0, 0.7, 1.0])
    assert (b["sample_id"], b["source"], b["targets"], b["kept"]) == ("b", "src-b", 2, 1)
    assert [b[k] for k in ("kept_share", "mean_score", "mean_rel", "mean_entropy", "mean_loss")] == pytest.approx(
        [0.5, 0.5, 1.25, 1.5, 1.0])


def test_sample_rollups_of_a_folder_scored_before_entropy_have_no_mean_entropy(tmp_path):
    _, scores = literal_folders(tmp_path)
    as_written_before(scores, ("entropy_cur", "weight"))
    assert "entropy_cur" not in pl.read_parquet_schema(scores / "part-00000.parquet")
    rollups = sample_rollups(open_masks_folder(scores))
    assert rollups["mean_entropy"].to_list() == [None, None] and rollups["mean_rel"].to_list() == pytest.approx([0.0, 1.25])
    with pytest.raises(ArtifactError, match="round 3 is not in"):
        sample_rollups(open_masks_folder(scores), round=3)


def test_pick_samples_by_score_random_and_id(tmp_path):
    tokenized = write_synthetic_tokenized(tmp_path / "tok", _tokenizer_dir(tmp_path), samples=30, mean_tokens=20)
    samples = open_masks_folder(write_synthetic_scores(tmp_path / "scores", tokenized)).samples().collect()
    ranked = samples.sort(["mean_score", "sample_id"], descending=[True, False])["sample_id"].to_list()
    chosen = pick_samples(samples, ids=["s0000003"], top=2, bottom=1, random=3, seed=1)
    assert chosen[:4] == [("asked for", "s0000003"), ("highest score", ranked[0]), ("highest score", ranked[1]),
                          ("lowest score", ranked[-1])]
    drawn = [sid for why, sid in chosen if why == "random"]
    assert len(drawn) == 3 and drawn == [sid for why, sid in pick_samples(samples, ids=["s0000003"], top=2, bottom=1,
                                                                         random=3, seed=1) if why == "random"]
    assert len({sid for _, sid in chosen}) == len(chosen)
    with pytest.raises(ArtifactError, match="sample id 'nope' is not among the 30 samples"):
        pick_samples(samples, ids=["nope"])


def _tokenizer_dir(tmp_path):
    from tests import tiny

    return tiny.save_tokenizer(tmp_path / "tokenizer")


def test_a_run_folder_gives_every_finished_round_and_its_training_curve(tmp_path):
    run = write_synthetic_run(tmp_path / "run", _tokenizer_dir(tmp_path), samples=12, rounds=2, steps=3)
    stats = open_stats(run)
    assert [p.round for p in stats.parts] == [0, 1]
    assert stats.parts[1].signals == run / "rounds" / "r001" / "scores"
    assert stats.rounds().collect()["round"].to_list() == [0, 1]
    curves = train_curves(stats)
    assert curves["step"].to_list() == [1, 2, 3, 4, 5, 6] and curves["round"].to_list() == [0, 0, 0, 1, 1, 1]
    flips = stats.flips(0, 1).collect()
    before = stats.tokens().filter(pl.col("round") == 0).collect()
    after = stats.tokens().filter(pl.col("round") == 1).collect()
    changed = before.join(after, on=["sample_id", "position"]).filter(pl.col("keep") != pl.col("keep_right"))
    assert flips.height == changed.height > 0


def test_unfinished_rounds_are_left_out(tmp_path):
    run = write_synthetic_run(tmp_path / "run", _tokenizer_dir(tmp_path), samples=6, rounds=2)
    (run / "rounds" / "r001" / "masks" / "manifest.json").unlink()
    assert [p.round for p in open_stats(run).parts] == [0]


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "is not an sstoken artifact folder"),
    ("tokenized", "holds a 'tokenized' artifact, not keep masks"),
    ("eval", "is an eval folder"),
    ("bad run", "run.json is not a run record (run.json of `sstoken run`): not readable as JSON"),
    ("moved data", "which does not exist (moved?); pass --data"),
    ("changed shard", "does not match the checksum"),
])
def test_folders_that_are_not_artifacts_are_refused_in_one_line(tmp_path, case, message):
    tokenized, scores = literal_folders(tmp_path)
    folder = {"missing": tmp_path / "nothing", "empty": tmp_path, "tokenized": tokenized, "eval": tmp_path / "eval",
              "bad run": tmp_path / "run", "moved data": scores, "changed shard": scores}[case]
    if case == "eval":
        folder.mkdir()
        (folder / "eval.json").write_text("{}")
    if case == "bad run":
        folder.mkdir()
        (folder / "run.json").write_text("{not json")
    if case == "moved data":
        tokenized.rename(tmp_path / "elsewhere")
    if case == "changed shard":
        path = scores / "part-00000.parquet"
        path.write_bytes(path.read_bytes() + b"x")
    with pytest.raises(ArtifactError, match=re.escape(message)) as error:
        open_stats(folder)
    assert "\n" not in str(error.value)


def test_masks_of_other_data_are_refused(tmp_path):
    _, scores = literal_folders(tmp_path)
    other = write_synthetic_tokenized(tmp_path / "other", _tokenizer_dir(tmp_path), samples=3, mean_tokens=10)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["tokenizer"] = json.loads((scores / "manifest.json").read_text())["tokenizer"]
    write_manifest(other, manifest)
    with pytest.raises(ArtifactError, match="made from other tokenized data"):
        open_stats(scores, data=other)
