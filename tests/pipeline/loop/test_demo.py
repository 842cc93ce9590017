"""The embedded demo end to end, with the tiny model standing in for the real one."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from pipeline.artifacts.files import read_manifest
from pipeline.cli import main
from pipeline.core.config import ConfigError, load_config
from pipeline.loop.demo import BUNDLED_CORPUS, DemoConfig
from pipeline.stages.configs import PrepareConfig, ScoreJobConfig


def test_demo_prepares_and_scores_into_a_round_folder(tmp_path, llama_dir, ray_local, capsys):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer number {i}."}) + "\n"
                              for i in range(12)))
    argv = ["demo", "--output", str(tmp_path / "run"), "--corpus", str(corpus), "--model", str(llama_dir),
            "--prepare.rows-per-shard", "5", "--score.workers", "1", "--no-score.progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "prepare →" in printed and "score →" in printed and "targets" in printed and "kept" in printed

    scores_dir = tmp_path / "run" / "rounds" / "r000" / "scores"
    manifest = read_manifest(scores_dir, kind="scores")
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert read_manifest(tmp_path / "run" / "tokenized")["counts"]["rows_written"] == 12
    scores = pl.read_parquet(scores_dir / "part-*.parquet")
    assert scores.height == 12 and scores["sample_id"].n_unique() == 12
    # Round 0: current == history, so the excess loss is 0 everywhere and selection is attention-only.
    rel = scores["rel"].explode().drop_nans().drop_nulls()
    assert rel.len() > 0 and (rel == 0).all()
    assert manifest["config"]["workers"] == 1 and manifest["config"]["current"] == str(llama_dir)


def test_demo_sections_are_the_stage_configs_with_demo_defaults_and_derived_paths(tmp_path, llama_dir):
    config = DemoConfig(output=tmp_path / "run", model=str(llama_dir))
    assert config.prepare == PrepareConfig(
        input=[BUNDLED_CORPUS], tokenizer=str(llama_dir), output=tmp_path / "run" / "tokenized",
        max_length=512, rows_per_shard=128,
    )
    assert config.score == ScoreJobConfig(
        data=tmp_path / "run" / "tokenized", current=llama_dir, history=llama_dir,
        output=tmp_path / "run" / "rounds" / "r000" / "scores", history_cache=tmp_path / "run" / "history_cache",
    )


def test_demo_with_no_arguments_points_at_the_cached_real_model(tmp_path, monkeypatch):
    """`sstoken demo` alone: the config is complete before anything is fetched (the fetch runs with the demo)."""
    monkeypatch.setenv("SSTOKEN_CACHE", str(tmp_path))
    config = DemoConfig()
    assert config.prepare.tokenizer == str(tmp_path / "models" / "smollm2-135m") and config.prepare.max_length == 512
    assert config.score.current == config.score.history == tmp_path / "models" / "smollm2-135m"
    assert config.prepare.input == [BUNDLED_CORPUS] and not (tmp_path / "models").exists()


def test_demo_derives_exactly_the_settings_it_declares(llama_dir):
    top = {"output": Path("run"), "corpus": [BUNDLED_CORPUS], "model": str(llama_dir)}
    derived = DemoConfig.derived_settings(top)
    assert {section: sorted(names) for section, names in derived.items()} == {
        section: sorted(names) for section, names in DemoConfig.derived_fields.items()
    }


def test_demo_config_file_with_sections_and_flags(tmp_path, llama_dir):
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(f"model: {llama_dir}\nprepare:\n  max-length: 256\nscore:\n  ratio: 0.4\n  workers: 1\n")
    overrides = {"output": tmp_path / "run", "score": {"ratio": 0.3}, "prepare": {"max_length": None}}
    config = load_config(DemoConfig, config_file, overrides)
    assert (config.prepare.max_length, config.score.ratio, config.score.workers) == (None, 0.3, 1)
    config_file.write_text("score:\n  output: /elsewhere\n")
    with pytest.raises(ConfigError, match="score.output cannot be set"):
        load_config(DemoConfig, config_file)


def test_the_repository_demo_config_states_the_demo_defaults(llama_dir):
    config_file = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "demo.yaml"
    assert load_config(DemoConfig, config_file, {"model": str(llama_dir)}) == DemoConfig(model=str(llama_dir))


def test_demo_with_a_missing_corpus_names_it(tmp_path, capsys):
    assert main(["demo", "--corpus", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")]) == 2
    assert "nowhere not found" in capsys.readouterr().err
