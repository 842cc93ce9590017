"""`sstoken run` end to end on a tiny model: two slice rounds in one folder (one run shared by the tests here)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.loop.rounds import read_train_loss, run_loop
from pipeline.loop.run_config import RunConfig
from pipeline.loop.run_folder import RUN_SCHEMA, RunFolder, read_run_record
from pipeline.runtime.checkpoints import checkpoint_fingerprint
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_manifest
from pipeline.runtime.schemas import validate_json

WORDS = "the quick brown fox jumps over lazy dog what is capital of france paris tokens are selected".split()


def write_corpus(path: Path, samples: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choices(WORDS, k=8)) + f" {i}?", "response": " ".join(rng.choices(WORDS, k=12))}
            for i in range(samples)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_settings(output: Path, corpus: Path, model: Path) -> dict:
    """A small two-round run: 2 slices of 16 samples, 2 optimizer steps per round."""
    return {
        "output": output, "corpus": [corpus], "model": str(model), "slices": 2,
        "prepare": {"rows_per_shard": 5},
        "score": {"workers": 1, "progress": False},
        "train": {"batch_size": 4, "micro_batch_size": 2, "lora_r": 4, "progress": False, "checkpoint_every": 1},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory, llama_dir, ray_local) -> tuple[RunConfig, dict]:
    root = tmp_path_factory.mktemp("loop")
    settings = run_settings(root / "run", write_corpus(root / "corpus.jsonl", 16), llama_dir)
    # The models in this process (the same shards and tensors as Ray actors and Ray Train: test_score_in_process
    # and test_train show it) spare the actors' and Ray Train's start-ups; the loop through Ray actors and Ray
    # Train runs in the slow tests (test_run_recovery, the two-node run).
    settings["ray"] = {"runner": "process"}
    config = RunConfig(**settings)
    return config, run_loop(config).record.as_json()


def _ids(folder: Path) -> list[str]:
    manifest = read_manifest(folder)
    return [i for s in manifest["shards"] for i in pq.read_table(folder / s["file"], columns=["sample_id"]).column("sample_id").to_pylist()]


def test_two_slice_rounds_each_scored_by_the_model_that_has_not_trained_on_it(finished, llama_dir):
    config, record = finished
    run = RunFolder(config.output)
    assert record["status"] == "done" and [r["round"] for r in record["rounds"]] == [0, 1]
    first, second = record["rounds"]
    # Every sample in exactly one slice, the slices made from the prepared corpus.
    assert sorted(_ids(run.data(0)) + _ids(run.data(1))) == sorted(_ids(run.tokenized))
    assert not set(_ids(run.data(0))) & set(_ids(run.data(1)))
    # Round 0: the base against itself, attention-only, said so; round 1: round 0's checkpoint against the base.
    base = checkpoint_fingerprint(llama_dir)
    assert first["current"]["fingerprint"] == first["history"]["fingerprint"] == base
    assert first["selection"]["method"] == "attn" and "REL is 0" in first["warmup"]
    assert second["current"]["path"] == str(run.checkpoint(0)) and second["train_from"] == str(run.checkpoint(0))
    assert second["current"]["fingerprint"] == checkpoint_fingerprint(run.checkpoint(0)) != base
    assert second["history"] == {"path": str(llama_dir), "fingerprint": base, "policy": "base"}
    assert second["selection"]["method"] == "sstoken" and second["warmup"] is None
    scores = read_manifest(run.scores(1), kind="scores")
    assert scores["checkpoints"]["current"]["fingerprint"] == second["current"]["fingerprint"]
    assert read_manifest(run.masks(1), kind="masks")["selection"]["method"] == "sstoken"
    # One learning-rate schedule across the rounds.
    assert record["schedule"] == {"total_steps": 4, "steps_per_round": [2, 2]}
    assert [r["schedule"] for r in record["rounds"]] == [{"start_step": 0, "total_steps": 4}, {"start_step": 2, "total_steps": 4}]
    # The figures per round: loss, kept ratio, the stages' seconds.
    for entry in record["rounds"]:
        summary = entry["summary"]
        assert summary["train_loss"] == read_train_loss(run.train(entry["round"])) and summary["train_loss"] > 0
        assert 0.5 < summary["kept_ratio"] < 0.7 and summary["kept"] <= summary["trainable"]
        assert summary["score_s"] > 0 and summary["train_s"] > 0 and summary["rescore_to_train"] > 0
        assert entry["checkpoint_fingerprint"] == checkpoint_fingerprint(run.root / entry["checkpoint"])
    assert json.loads(run.record.read_text()) == record
    validate_json(record, RUN_SCHEMA, "run.json")  # the schema holds the record the loop wrote
    assert read_run_record(run).as_json() == record


def test_rerun_keeps_finished_rounds_and_other_settings_are_refused(finished, capsys):
    config, record = finished
    run = RunFolder(config.output)
    weights = run.checkpoint(1) / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    config_file = config.output.parent / "run.yaml"
    settings = run_settings(config.output, config.corpus[0], Path(config.model))
    config_file.write_text(json.dumps(settings, default=str))  # JSON is YAML
    assert main(["run", str(config_file)]) == 0
    captured = capsys.readouterr()
    assert "r000: done earlier" in captured.err and "r001: done earlier" in captured.err
    assert "r001" in captured.out and "sstoken" in captured.out and str(run.checkpoint(1)) in captured.out
    assert weights.stat().st_mtime_ns == stamp
    again = json.loads(run.record.read_text())
    assert again["rounds"] == record["rounds"]
    with pytest.raises(UserError, match="other settings \\(select differ\\)"):
        run_loop(RunConfig(**settings | {"select": {"ratio": 0.3}}))


def test_a_round_of_fewer_samples_than_a_batch_is_refused(tmp_path, llama_dir, ray_local):
    settings = run_settings(tmp_path / "run", write_corpus(tmp_path / "c.jsonl", 6), llama_dir)
    with pytest.raises(UserError, match="round 0 has 3 samples, fewer than train.batch_size 4"):
        run_loop(RunConfig(**settings))
    assert not (tmp_path / "run" / "rounds").exists()


def test_checkpoints_of_the_rounds_differ(finished):
    config, _ = finished
    run = RunFolder(config.output)
    first, second = (load_file(run.checkpoint(i) / "model.safetensors") for i in (0, 1))
    assert first.keys() == second.keys()
    assert any(not torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("case", ["user run.json", "foreign file", "run.json folder", "inside the corpus", "corpus inside"])
def test_a_run_folder_the_run_did_not_make_is_refused_before_anything_is_written(tmp_path, llama_dir, capsys, case):
    """Issue 20 item 4: `sstoken run --output` into an existing folder used to overwrite a user's run.json and
    tolerate foreign files; output inside the corpus folder was refused but left run.json and .lock behind; a run.json
    that is a folder gave a traceback. Now each is one line, exit 2, and the folder is left exactly as it was."""
    corpus_folder = tmp_path / "corpus"
    corpus_folder.mkdir()
    corpus = write_corpus(corpus_folder / "c.jsonl", 8)
    output = tmp_path / "run"
    output.mkdir()
    if case == "user run.json":
        (output / "run.json").write_text('{"my": "notes"}')
    elif case == "foreign file":
        (output / "notes.txt").write_text("mine")
    elif case == "run.json folder":
        (output / "run.json").mkdir()
    elif case == "inside the corpus":
        output.rmdir()
        output, corpus = corpus_folder / "run", corpus_folder  # the corpus given as its folder
    else:
        (output / "data").mkdir()
        corpus = write_corpus(output / "data" / "c.jsonl", 8)
    before = sorted(p.name for p in output.iterdir()) if output.exists() else None
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps(run_settings(output, corpus, llama_dir), default=str))
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err.strip()
    expected = {"user run.json": "did not write: run.json", "foreign file": "did not write: notes.txt",
                "run.json folder": "did not write: run.json", "inside the corpus": "is inside the input folder",
                "corpus inside": "c.jsonl is inside the output folder"}[case]
    assert expected in err and len(err.splitlines()) == 1, err
    assert (sorted(p.name for p in output.iterdir()) if output.exists() else None) == before
    if case == "user run.json":
        assert (output / "run.json").read_text() == '{"my": "notes"}'
