"""`sstoken run` with `train: {selection: online}`: the demo corpus end to end in one continuous training.

The score stage runs once, over the history model only (its NLLs into the run's cache); no select stage runs;
the train stage's steps select their own tokens and write them to rounds/r000/train/masks, which validate,
report and export like offline masks. Models in this process (`runner: process`).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.loop.demo import BUNDLED_CORPUS
from pipeline.loop.rounds import run_loop
from pipeline.loop.run_config import RunConfig
from pipeline.runtime.files import read_manifest


def _settings(output: Path, model: Path, **train) -> dict:
    return {
        "output": output, "corpus": [BUNDLED_CORPUS], "model": str(model), "samples": 12, "ray": {"runner": "process"},
        "prepare": {"max_length": 256, "rows_per_shard": 8},
        "score": {"progress": False},
        "select": {"method": "sstoken", "ratio": 0.5},
        "train": {"selection": "online", "batch_size": 4, "micro_batch_size": 2, "lora_r": 4, "progress": False,
                  "checkpoint_every": 1} | train,
    }


@pytest.fixture(scope="module")
def online_run(tmp_path_factory, llama_dir):
    root = tmp_path_factory.mktemp("online-run")
    config = RunConfig(**_settings(root / "run", llama_dir, online={"warmup_samples": 4}))
    return config, run_loop(config)


def test_an_online_run_is_one_round_scored_once_for_its_history_and_trained_once(online_run, llama_dir):
    config, result = online_run
    record, folder = result.record, result.folder
    assert record.status == "done" and len(record.rounds) == 1 and config.rounds == 1
    entry = record.rounds[0]
    assert sorted(entry.stages) == ["score", "train"]  # no select stage: the steps select
    assert entry.history is not None and entry.history.path == str(llama_dir)  # history base: the starting model
    masks = folder.inside(entry.masks, "a masks folder")
    assert masks == folder.train(0) / "masks"
    manifest = read_manifest(masks, kind="masks")
    assert manifest["selection"]["online"] is True and manifest["selection"]["warmup_steps"] == 1
    assert manifest["selection"]["method"] == "sstoken" and manifest["selection"]["ratio"] == 0.5
    assert manifest["counts"]["steps"] == record.schedule.total_steps == 3
    summary = entry.summary
    assert summary is not None and summary.kept == manifest["counts"]["kept"] and summary.trainable == manifest["counts"]["trainable"]
    assert 0.5 <= summary.kept_ratio < 0.6  # ceil(0.5 n) of each sample's n targets
    # The score stage cached the history's NLLs and stored no selection of its own worth training on.
    scores = read_manifest(folder.scores(0), kind="scores")
    assert scores["checkpoints"]["current"]["fingerprint"] == scores["checkpoints"]["history"]["fingerprint"]
    assert (folder.checkpoint(0) / "model.safetensors").is_file()


def test_an_online_runs_masks_validate_and_a_rerun_keeps_everything(online_run, capsys):
    config, result = online_run
    folder = result.folder
    assert main(["validate", str(folder.root)]) == 0, capsys.readouterr().out
    again = run_loop(config)
    assert again.record.rounds[0].checkpoint_fingerprint == result.record.rounds[0].checkpoint_fingerprint


@pytest.mark.parametrize(
    ("top", "message"),
    [
        ({"round_unit": "slice"}, "round_unit slice cannot be set with it"),
        ({"epochs": 2}, "epochs 2 cannot be set with it"),
        ({"history": "previous"}, "history previous cannot be set with it"),
        ({"slices": 3}, "slices cannot be set with it"),
    ],
)
def test_round_settings_an_online_run_cannot_have_are_refused(top, message, llama_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        RunConfig(**_settings(tmp_path / "run", llama_dir) | top)


def test_the_select_section_decides_the_online_method(llama_dir, tmp_path):
    config = RunConfig(**_settings(tmp_path / "run", llama_dir) | {"select": {"method": "attn", "ratio": 0.3}})
    assert config.train.online.method == "attn" and config.train.online.ratio == 0.3 and config.train.masks is None


def test_the_eval_measures_the_online_steps_after_the_warm_up_only(online_run):
    from pipeline.eval.evaluate import trained_after_warmup

    _, result = online_run
    folder, entry = result.folder, result.record.rounds[0]
    masks = folder.inside(entry.masks, "a masks folder")
    counted = trained_after_warmup(masks)
    assert counted is not None and len(counted) == 8  # steps 2 and 3 of 4 samples; step 1 was the warm-up
