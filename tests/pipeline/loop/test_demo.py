"""The embedded demo end to end, with the tiny model standing in for the real one."""

from __future__ import annotations

import json

import polars as pl

from pipeline.artifacts.files import read_manifest
from pipeline.cli import main
from pipeline.loop.demo import DemoConfig, run_demo


def test_demo_prepares_and_scores_into_a_round_folder(tmp_path, llama_dir, ray_local):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer number {i}."}) + "\n"
                              for i in range(12)))
    config = DemoConfig(output=tmp_path / "run", corpus=[corpus], model=str(llama_dir), rows_per_shard=5)
    prepared, scored = run_demo(config)

    assert (prepared.counts["rows_read"], prepared.counts["rows_written"]) == (12, 12)
    scores_dir = tmp_path / "run" / "rounds" / "r000" / "scores"
    manifest = read_manifest(scores_dir, kind="scores")
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    scores = pl.read_parquet(scores_dir / "part-*.parquet")
    assert scores.height == 12 and scores["sample_id"].n_unique() == 12
    # Round 0: current == history, so the excess loss is 0 everywhere and selection is attention-only.
    rel = scores["rel"].explode().drop_nans().drop_nulls()
    assert rel.len() > 0 and (rel == 0).all()
    assert scored.counts["kept"] == scores["n_kept"].sum() and scored.counts["samples"] == 12


def test_demo_with_a_missing_corpus_names_it(tmp_path, capsys):
    assert main(["demo", "--corpus", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")]) == 2
    assert "nowhere not found" in capsys.readouterr().err
