"""The embedded demo: a run config with the demo's defaults, and its closing report."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from rich.console import Console

from pipeline.cli import main
from pipeline.cli.demo import report
from pipeline.data.prepare_config import PrepareConfig
from pipeline.loop.demo import BUNDLED_CORPUS, DemoConfig, DemoRun
from pipeline.loop.rounds import RunResult
from pipeline.loop.run_folder import RunFolder, RunRecord
from pipeline.runtime.config import load_config
from pipeline.runtime.errors import UserError
from pipeline.selection.select_settings import SelectSettings
from tests.factories import write_tokenized

ROOT = Path(__file__).resolve().parents[3]


def test_demo_defaults_two_epoch_rounds_over_a_subset_of_the_bundled_corpus(tmp_path, monkeypatch):
    """`sstoken demo` alone: the config is complete before anything is fetched (the fetch runs with the demo)."""
    monkeypatch.setenv("SSTOKEN_CACHE", str(tmp_path))
    config = DemoConfig()
    model = tmp_path / "models" / "smollm2-135m"
    assert (config.round_unit, config.epochs, config.samples, config.rounds) == ("epoch", 2, 64, 2)
    assert config.prepare == PrepareConfig(
        input=[BUNDLED_CORPUS], tokenizer=str(model), output=Path("runs/demo/tokenized"), max_length=512, rows_per_shard=64
    )
    assert config.score.current == config.score.history == config.train.model == model
    assert (config.train.batch_size, config.train.micro_batch_size, config.train.finetune) == (8, 4, "lora")
    assert not (tmp_path / "models").exists()


def test_run_config_derives_exactly_the_settings_it_declares(llama_dir):
    top = {"output": Path("run"), "corpus": [BUNDLED_CORPUS], "model": str(llama_dir)}
    derived = DemoConfig.derived_settings(top)
    every_selection_setting = {"select": SelectSettings().model_dump()}  # given, they all reach the score section
    for section, values in DemoConfig.derived_from_sections(every_selection_setting).items():
        derived[section] = derived.get(section, {}) | values
    assert {section: sorted(names) for section, names in derived.items()} == {
        section: sorted(names) for section, names in DemoConfig.derived_fields.items()
    }


def test_demo_config_file_with_sections_and_flags(tmp_path, llama_dir):
    config_file = tmp_path / "demo.yaml"
    config_file.write_text(f"model: {llama_dir}\nprepare:\n  max-length: 256\nselect:\n  ratio: 0.4\ntrain:\n  lr: 0.001\n")
    overrides = {"output": tmp_path / "run", "select": {"ratio": 0.3}, "prepare": {"max_length": None}, "samples": 12}
    config = load_config(DemoConfig, config_file, overrides)
    assert (config.prepare.max_length, config.select.ratio, config.score.ratio, config.train.lr) == (None, 0.3, 0.3, 0.001)
    assert config.samples == 12 and config.train.output == tmp_path / "run" / "rounds" / "r000" / "train"
    config_file.write_text("score:\n  output: /elsewhere\n")
    with pytest.raises(UserError, match="score.output cannot be set"):
        load_config(DemoConfig, config_file)


def test_the_repository_demo_config_states_the_demo_defaults(llama_dir):
    config_file = ROOT / "jobs" / "configs" / "demo.yaml"
    assert load_config(DemoConfig, config_file, {"model": str(llama_dir)}) == DemoConfig(model=str(llama_dir))


def test_demo_with_a_missing_corpus_names_it(tmp_path, capsys):
    assert main(["demo", "--corpus", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")]) == 2
    assert "nowhere not found" in capsys.readouterr().err


def test_the_report_prints_each_round_the_agreement_a_sample_and_where_things_are(tmp_path, tokenizer, llama_dir):
    run = RunFolder(tmp_path / "run")
    data = write_tokenized(run.subset, tokenizer, [3])
    rows = pq.read_table(data / "part-00000.parquet").to_pylist()
    run.masks(1).mkdir(parents=True)
    keep = [[t and i % 2 == 0 for i, t in enumerate(r["trainable"])] for r in rows]
    pq.write_table(pa.table({"sample_id": [r["sample_id"] for r in rows], "keep": keep}), run.masks(1) / "part-00000.parquet")
    rounds = [
        {"round": i, "epoch": i, "slice": None, "samples": 3, "status": "done", "stages": {},
         "selection": {"method": method}, "warmup": "note" if i == 0 else None,
         "data": "subset", "scores": f"rounds/r00{i}/scores", "masks": f"rounds/r00{i}/masks",
         "checkpoint": f"rounds/r00{i}/train/checkpoint",
         "summary": {"kept_ratio": 0.61, "train_loss": loss, "kept": 10, "trainable": 16, "history_computed": 0,
                     "history_reused": 0, "score_s": 10.0, "select_s": 0.2, "train_s": 40.0, "rescore_to_train": 0.25}}
        for i, (method, loss) in enumerate([("attn", 3.25), ("sstoken", 2.5)])
    ]
    record = RunRecord.model_validate({
        "version": 1, "created_at": "2026-01-01T00:00:00+00:00", "updated_at": "2026-01-01T00:00:00+00:00",
        "status": "done", "identity": "x", "settings": {}, "config": {}, "round_unit": "epoch",
        "history": {"policy": "base"}, "selection": {"method": "sstoken"},
        "models": {"base": {"path": str(llama_dir), "fingerprint": "b"}, "reference": None}, "rounds": rounds,
    })
    agreement = {"samples": 3, "trainable": 40, "same_decision": 0.875, "kept_overlap": 0.75}
    console = Console(record=True, width=140)
    assert report(DemoRun(run=RunResult(folder=run, record=record, prepared=None), agreement=agreement), console) == 0
    text = console.export_text()
    assert "attn warm-up" in text and "3.25" in text and "2.5" in text and "0.610" in text
    assert "87.5% same keep/drop decision" in text and "75.0% of the tokens either round kept" in text
    assert f"last checkpoint: {run.root / 'rounds/r001/train/checkpoint'}" in text
    assert "kept)" in text  # the sample view: its targets and kept tokens
