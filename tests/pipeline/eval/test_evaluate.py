"""`sstoken eval` at the smoke size (jobs/configs/eval.smoke.yaml on a tiny model): the harness, not the science.

One eval shared by the tests here (a module fixture): every row, the oracle included, one seed, one pass in two
slices (slice 0 the warm-up).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.eval.config import ALL_METHODS, EvalConfig
from pipeline.eval.evaluate import cell_folder, column_by_sample, measures_path, run_eval
from pipeline.eval.records import EVAL_SCHEMA, MEASURES_SCHEMA, read_eval, read_measures
from pipeline.eval.table import spread
from pipeline.loop.run_folder import RunFolder
from pipeline.loop.slices import corpus_ids
from pipeline.runtime.config import load_config
from pipeline.runtime.errors import UserError
from pipeline.runtime.schemas import validate_json
from pipeline.selection.keep_masks import read_keep_masks

SMOKE = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "eval.smoke.yaml"


def smoke_config(output: Path, model: Path, **overrides) -> EvalConfig:
    return load_config(EvalConfig, SMOKE, {"output": output, "model": str(model)} | overrides)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, llama_dir, ray_local):
    config = smoke_config(tmp_path_factory.mktemp("eval") / "out", llama_dir)
    return config, run_eval(config)


def _rows(report: dict) -> dict[str, dict]:
    return {r["method"]: r["values"] for r in report["table"]}


def test_every_row_over_every_seed_in_eval_json(evaluated):
    config, result = evaluated
    report = json.loads((config.output / "eval.json").read_text())
    assert report == result.report.as_json() and read_eval(config.output) == result.report
    validate_json(report, EVAL_SCHEMA, "eval.json")  # the schemas hold the records the eval wrote
    for path in (config.output / "cells").glob("seed-*/*.measures.json"):
        validate_json(json.loads(path.read_text()), MEASURES_SCHEMA, str(path))
        assert read_measures(path).as_json() == json.loads(path.read_text())
    assert report["kind"] == "eval" and report["schema_version"] == 2
    assert report["methods"] == config.methods and [r["method"] for r in report["table"]] == ["base", *config.methods]
    keys = [m["key"] for m in report["measures"]]
    assert keys == ["heldout_nll", "exact_match", "auroc_within", "drop_share", "corrupted_dropped", "auroc_pooled",
                    "kept_tokens", "steps", "score_s", "train_s"]
    rows = _rows(report)
    for method in config.methods:
        assert rows[method]["heldout_nll"]["n"] == 1 and rows[method]["heldout_nll"]["mean"] > 0
        assert rows[method]["train_s"]["mean"] > 0 and rows[method]["score_s"]["mean"] > 0
        assert 0 <= rows[method]["exact_match"]["mean"] <= 1
    # The base row: the untrained model's held-out figures only.
    assert set(rows["base"]) == {"heldout_nll", "exact_match"}
    assert report["max_new_tokens"] == {"0": 8}  # as the smoke config sets it (see the test of seed_data below)


def test_the_oracle_is_perfect_and_full_is_chance(evaluated):
    _, result = evaluated
    rows = _rows(result.report.as_json())
    for oracle in ("oracle", "oracle_global"):
        assert rows[oracle]["auroc_within"]["mean"] == 1.0 and rows[oracle]["drop_share"]["mean"] == 1.0
        assert rows[oracle]["corrupted_dropped"]["mean"] > 0.5
    assert rows["oracle_global"]["auroc_pooled"]["mean"] == 1.0
    assert rows["oracle"]["auroc_pooled"]["n"] == 0  # pooled AUROC only for a global selection
    assert rows["full"]["auroc_within"]["mean"] == 0.5 and rows["full"]["corrupted_dropped"]["mean"] == 0.0
    assert rows["full"]["drop_share"]["n"] == 0  # drops nothing: no share of the oracle's
    for method in ("random", "sstoken", "rho1_global", "tokencleaning_global"):
        assert 0 <= rows[method]["auroc_within"]["mean"] <= 1 and 0 <= rows[method]["drop_share"]["mean"] <= 1
    assert rows["random"]["auroc_pooled"]["n"] == rows["sstoken"]["auroc_pooled"]["n"] == 0
    for method in ("rho1_global", "tokencleaning_global"):
        assert 0 <= rows[method]["auroc_pooled"]["mean"] <= 1
    kinds = result.report.kinds
    assert kinds and set(kinds) <= {"wrong_result", "random_tokens", "shuffled", "filler", "prompt_copy"}
    assert all(rows["oracle"][f"auroc_within:{kind}"]["mean"] == 1.0 for kind in kinds)  # the kinds measured


def test_one_pass_in_slices_each_scored_before_it_is_trained_on(evaluated):
    config, result = evaluated
    by_round = {(e["method"], e["round"]): e for e in result.report.as_json()["selection_by_round"]}
    assert set(by_round) == {(m, r) for m in config.methods for r in (0, 1)}
    # slice 0 is the warm-up: attention for the ssToken family, every token for tokencleaning; only slice 1 counts
    assert by_round["sstoken", 0]["selection"] == "attn" and by_round["sstoken", 1]["selection"] == "sstoken"
    assert by_round["tokencleaning_global", 0]["selection"] == "full"
    assert by_round["tokencleaning_global", 1]["selection"] == "tokencleaning"
    assert by_round["rho1_global", 0]["selection"] == "rho1" and by_round["oracle", 0]["selection"] == "oracle"
    assert all(e["measured"] == (e["round"] == 1) for e in by_round.values())
    record = json.loads(RunFolder(cell_folder(config, 0, "sstoken")).record.read_text())
    assert record["round_unit"] == "slice" and [r["slice"] for r in record["rounds"]] == [0, 1]
    assert record["rounds"][1]["current"]["path"].endswith("rounds/r000/train/checkpoint")
    assert record["rounds"][1]["history"]["path"] == record["rounds"][0]["current"]["path"]  # the base
    run = RunFolder(cell_folder(config, 0, "sstoken"))
    slices = [set(corpus_ids(run.data(index))) for index in (0, 1)]
    assert not slices[0] & slices[1] and len(slices[0] | slices[1]) == config.task_train


def test_every_row_sees_the_same_samples_in_the_same_steps_and_the_kept_tokens_are_printed(evaluated):
    config, result = evaluated
    report = result.report.as_json()
    rows = _rows(report)
    steps = {method: rows[method]["steps"]["mean"] for method in config.methods}
    assert steps["full_tokens"] < steps["full"]  # token-matched: fewer samples, fewer steps
    assert {s for m, s in steps.items() if m != "full_tokens"} == {steps["full"]} and steps["full"] == 4
    kept = {method: rows[method]["kept_tokens"]["mean"] for method in config.methods}
    # every per-sample row keeps ceil(ratio * n) of each sample: the same budget; a global one ceil(ratio * N) of the
    # round, within half a token a sample of it (tokencleaning warms up on every token)
    assert kept["oracle"] == kept["random"] == kept["sstoken"]
    assert abs(kept["oracle_global"] - kept["oracle"]) <= 4 and abs(kept["rho1_global"] - kept["oracle"]) <= 4
    assert kept["full"] > kept["tokencleaning_global"] > kept["sstoken"]
    assert 0.6 < kept["full_tokens"] / kept["sstoken"] < 1.6
    record = json.loads(RunFolder(cell_folder(config, 0, "full")).record.read_text())
    assert all(r["summary"]["kept_ratio"] == 1.0 for r in record["rounds"]) and record["samples"] == config.task_train
    assert record["config"]["train"]["epochs"] == 1
    text = (config.output / "eval.md").read_text()
    assert "kept tokens |" in text and "optimizer steps |" in text


def test_a_weighted_row_trains_on_its_weights_and_a_global_row_ranks_the_whole_round(evaluated):
    config, result = evaluated
    kept = {method: r["kept_tokens"]["mean"] for method, r in _rows(result.report.as_json()).items() if method != "base"}
    weighted = RunFolder(cell_folder(config, 0, "entropy-gated"))
    for index in (0, 1):  # no warm-up: entropy-gated needs no REL
        source, table = read_keep_masks(weighted.masks(index))
        assert source.manifest["selection"]["method"] == "entropy-gated"
        keep = np.concatenate([np.asarray(k, bool) for k in table.column("keep").to_pylist()])
        weight = np.concatenate([np.asarray(w, np.float32) for w in table.column("weight").to_pylist()])
        assert (weight[~keep] == 0).all() and (weight[keep] > 0).all() and (weight[keep] <= 1).all()
        assert len(np.unique(weight[keep])) > 1  # weights, not keep as 0/1
    assert kept["entropy-gated"] == kept["oracle"]  # per sample: the same budget
    corpus_wide = RunFolder(cell_folder(config, 0, "sstoken_global"))
    selections = [read_keep_masks(corpus_wide.masks(index))[0].manifest["selection"] for index in (0, 1)]
    assert [s["method"] for s in selections] == ["attn", "sstoken"]  # the attention warm-up, corpus-wide too
    assert all(s["granularity"] == "global" and s["k"] > 0 for s in selections)
    assert abs(kept["sstoken_global"] - kept["oracle"]) <= 4  # ceil(ratio * N) of the round: within a token a sample


def test_the_reference_trains_on_problems_disjoint_from_the_training_set(evaluated):
    config, _ = evaluated
    data = config.output / "data" / "seed-0"
    prompts = {name: {m["content"] for line in (data / f"{name}.jsonl").read_text().splitlines()
                      for m in json.loads(line)["messages"] if m["role"] == "user"} for name in ("train", "reference")}
    assert prompts["reference"] and not prompts["reference"] & prompts["train"]
    record = json.loads(RunFolder(cell_folder(config, 0, "rho1_global")).record.read_text())
    assert record["models"]["reference"]["path"].endswith("cells/seed-0/reference/rounds/r000/train/checkpoint")


def test_the_oracle_goes_through_the_same_masks_with_the_task_labels(evaluated):
    from pipeline.selection.token_labels import read_token_labels

    config, _ = evaluated
    labels = read_token_labels(config.output / "data" / "seed-0" / "token_labels.parquet")
    run = RunFolder(cell_folder(config, 0, "oracle"))
    record = json.loads(run.record.read_text())
    assert record["selection"]["method"] == "oracle" and len(record["selection"]["labels"]) == 64
    checked = 0
    for index in (0, 1):
        _, masks = read_keep_masks(run.masks(index))
        trainable = column_by_sample(run.data(index), "tokenized", "trainable")
        for sample_id, keep in zip(masks.column("sample_id").to_pylist(), masks.column("keep").to_pylist()):
            keep, drop, targets = np.asarray(keep), labels[sample_id], np.asarray(trainable[sample_id])
            if drop.sum() <= (targets & ~keep).sum():
                assert not (keep & drop).any()  # the budget covers the corrupted tokens: all dropped
            else:
                assert keep[targets & ~drop].all()  # it does not: every clean token kept
            checked += int(drop.any())
    assert checked >= 2  # corrupted samples were there to drop


def test_the_power_gate_says_it_cannot_tell_with_one_seed(evaluated):
    config, result = evaluated
    report = result.report.as_json()
    assert [g["key"] for g in report["power"]] == ["heldout_nll", "exact_match"]
    assert all(not g["passes"] and g["seeds"] == 1 and g["spread"] is None for g in report["power"])
    assert report["ranking"] == {} and "cannot tell methods apart at this size" in report["verdict"]
    text = (config.output / "eval.md").read_text()
    assert text.startswith(f"**{report['verdict']}**") and "Power gate: oracle − full against 3 × the seed spread" in text
    assert "Ranking by" not in text


def test_markdown_table_and_plot(evaluated):
    config, _ = evaluated
    text = (config.output / "eval.md").read_text()
    for method in config.methods:
        assert f"| {method} | " in text
    assert "held-out NLL ↓" in text and "| sstoken | 1 | sstoken | yes |" in text
    assert "AUROC within corrupted samples, by corruption kind" in text
    svg = (config.output / "eval.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg
    assert "power gate failed: cannot tell methods apart at this size, do not rank" in svg


def test_report_renders_the_eval_folder(evaluated, tmp_path):
    config, result = evaluated
    assert main(["report", str(config.output), "--output", str(tmp_path / "eval.html")]) == 0
    page = (tmp_path / "eval.html").read_text()
    assert result.report.verdict in page and "oracle_global" in page


def test_a_second_call_redoes_nothing_and_a_cell_killed_before_its_measures_is_measured_again(evaluated):
    config, result = evaluated
    files = sorted((config.output / "cells").glob("seed-*/*.measures.json"))
    assert len(files) == len(config.methods) + 2  # every row, the reference and the base, per seed
    stamps = {f: f.stat().st_mtime_ns for f in files}
    again = run_eval(config)
    assert again.cells_run == 0 and again.cells_reused == len(files)
    assert {f: f.stat().st_mtime_ns for f in files} == stamps
    assert again.report.table == result.report.table
    # Killed after its rounds, before its measures: the rounds are kept, the measures made again, nothing else.
    checkpoint = RunFolder(cell_folder(config, 0, "sstoken")).checkpoint(1) / "model.safetensors"
    weights = checkpoint.stat().st_mtime_ns
    measures_path(config, 0, "sstoken").unlink()
    third = run_eval(config)
    assert third.cells_run == 1 and checkpoint.stat().st_mtime_ns == weights
    assert third.report.table == result.report.table
    # A measures file of an older version (another identity, another shape) is measured again, not an error.
    path = measures_path(config, 0, "random")
    path.write_text(json.dumps({"identity": "old", "seed": 0, "method": "random", "values": {}, "selection_by_round": [],
                                "wall_s": 1.0}))
    fourth = run_eval(config)
    assert fourth.cells_run == 1 and read_measures(path).schema_version == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["oracle", "full", "rho2"]}, "unknown method 'rho2'; the rows are oracle, oracle_global"),
        ({"methods": ["oracle", "full", "full_global"]}, "unknown method 'full_global'; the rows are oracle"),
        ({"methods": ["oracle", "full", "rho1"]}, "rho1 is now two rows: rho1_global or rho1_sample"),
        ({"methods": ["oracle", "full", "rel", "rel"]}, "rel given more than once"),
        ({"methods": []}, "give at least one method"),
        ({"methods": ["full", "sstoken"]}, "methods lacks oracle: the power gate compares oracle with full"),
        ({"corpus": "natural", "methods": ["oracle", "sstoken"]}, "oracle needs the task's known corrupted tokens"),
        ({"score": {"dtype": "bfloat16"}}, "score.dtype bfloat16: the eval scores in float32"),
        ({"round_unit": "epoch"}, "slices applies to round_unit slice"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"seeds": [-1]}, "seeds must be non-negative"),
        ({"seeds": []}, "give at least one seed"),
        ({"scale": 0}, "scale: Input should be greater than 0"),
        ({"task": {"train": 2}}, "task.train over 2 slices gives 2 samples a seed at scale 1, 1 a round"),
        ({"slices": 3}, "full_tokens, a select.ratio share of task.train, over 3 slices gives 4 samples"),
        ({"select": {"method": "rel"}}, "select.method cannot be set"),
        ({"select": {"labels": "x.parquet"}}, "select.labels cannot be set"),
        ({"task": {"kinds": ["algebra"]}}, "give each of arithmetic, unit_conversion, sorting at most once"),
        ({"task": {"corruptions": []}}, "give each of wrong_result, random_tokens"),
        ({"train": {"epochs": 2}}, "train.epochs cannot be set"),
        ({"score": {"runner": "ray"}}, "score.runner cannot be set in a stage section: set ray.runner in the ray: section"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, llama_dir, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(".", "\\.")):
        smoke_config(tmp_path / "out", llama_dir, **overrides)


def test_cells_are_keyed_on_the_base_models_weights_not_its_path(tmp_path, llama_dir, llama_history_dir, monkeypatch):
    """Other weights at the same path: the base is measured anew and every cell is another run (before: '2 done earlier')."""
    import shutil

    from pipeline.eval import evaluate
    from pipeline.eval.data import seed_data
    from pipeline.loop.rounds import run_identity

    base = Path(shutil.copytree(llama_dir, tmp_path / "base"))
    config = smoke_config(tmp_path / "out", base)
    data = seed_data(config, 0, base)
    monkeypatch.setattr(evaluate, "heldout_figures", lambda config, data, model: {"heldout_nll": 1.0})
    cells = evaluate._Cells(config)
    before = run_identity(evaluate.cell_run_config(config, data, "sstoken", None))
    for _ in range(2):
        evaluate._base_measures(cells, data, base)
    assert (cells.run, cells.reused) == (1, 1)
    shutil.copy(llama_history_dir / "model.safetensors", base / "model.safetensors")  # same path, other weights
    evaluate._base_measures(cells, data, base)
    assert (cells.run, cells.reused) == (2, 1)
    after = run_identity(evaluate.cell_run_config(config, data, "sstoken", None))
    assert {k for k in before if before[k] != after[k]} == {"model"}


def test_the_ray_section_reaches_every_stage_of_every_cell(tmp_path, llama_dir):
    from pipeline.eval.data import SeedData
    from pipeline.eval.evaluate import cell_run_config, reference_run_config
    from pipeline.runtime.ray_settings import RaySettings

    assert smoke_config(tmp_path / "out", llama_dir).ray == RaySettings(runner="process")  # the eval's default
    config = smoke_config(tmp_path / "out", llama_dir, ray={"address": "10.0.0.1:6379", "runner": "ray", "num_cpus": 2})
    data = SeedData(0, tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "reference.jsonl", 8,
                    tmp_path / "labels.parquet", tmp_path / "tokenized", 40)
    runs = [cell_run_config(config, data, method, tmp_path / "ref") for method in config.methods]
    for run in [*runs, reference_run_config(config, data)]:
        assert run.ray == run.score.ray == run.train.ray == config.ray


def test_every_row_becomes_the_run_it_names(tmp_path, llama_dir):
    from pipeline.eval.data import SeedData
    from pipeline.eval.evaluate import cell_run_config
    from pipeline.eval.rows import ROWS

    config = smoke_config(tmp_path / "out", llama_dir, methods=list(ALL_METHODS))
    data = SeedData(0, tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "reference.jsonl", 8,
                    tmp_path / "labels.parquet", tmp_path / "tokenized", 40)
    runs = {name: cell_run_config(config, data, name, tmp_path / "ref") for name in ALL_METHODS}
    online = runs.pop("sstoken_online")  # one continuous training: one round, the warm-up in samples (slice 0's)
    assert online.online and online.rounds == 1 and online.select.method == "sstoken" and online.train.masks is None
    assert online.train.online.warmup_samples == 4 and online.train.online.method == "sstoken"
    assert online.train.seed == online.select.seed == online.seed == 0 and online.train.epochs == 1.0
    # 9 samples in 2 slices of whole batches of 2 train 4 steps offline (a leftover in each slice): online stops there
    from pipeline.loop.rounds import planned_steps, plan_rounds

    odd = SeedData(0, data.train, data.heldout, data.reference, 9, data.labels, data.tokenized, 40)
    offline_run = cell_run_config(config, odd, "sstoken", tmp_path / "ref")
    offline = sum(planned_steps(offline_run, spec.samples) for spec in plan_rounds(offline_run, 9))
    online_odd = cell_run_config(config, odd, "sstoken_online", tmp_path / "ref")
    assert planned_steps(online_odd, 9) == offline == 4 and online_odd.train.epochs < 1.0
    for name, run in runs.items():
        row = ROWS[name]
        assert run.select.method == row.method and run.round_unit == "slice" and run.slices == 2 and run.epochs == 1
        assert run.train.epochs == 1.0 and run.train.seed == run.select.seed == run.seed == 0
        assert run.select.granularity == (row.granularity or "sample") and run.score.dtype == "float32"
        assert run.select.labels == (data.labels if name.startswith("oracle") else None)
        assert run.reference == (tmp_path / "ref" if name.startswith("rho1") else None)
        assert run.samples == (4 if name == "full_tokens" else None)  # ceil(0.5 x 8): token-matched
    assert runs["rho1_global"].select.granularity == "global" and runs["rho1_sample"].select.granularity == "sample"
    assert runs["tokencleaning_global"].warmup == runs["tokencleaning_sample"].warmup == "full"
    assert runs["tokencleaning_global"].reference is None  # self-evolving: slice k against the model after k-1
    assert runs["sstoken"].warmup == "attn" and runs["sstoken_ema"].history == "ema"
    # corpus-wide: every row of the eval's granularity but full (every token either way) and the EMA variant
    assert sorted(n for n in ALL_METHODS if ROWS[n].granularity == "global") == sorted(
        ["oracle_global", "rho1_global", "tokencleaning_global", "random_global", "attn_global", "rel_global",
         "sstoken_global", "loss_global", "confidence_global", "entropy_global", "prob_global", "entropy-gated_global"])
    assert runs["attn_global"].warmup == "attn" and runs["entropy-gated"].select.method == "entropy-gated"
    assert runs["prob_global"].select.model_dump() == runs["prob"].select.model_dump() | {"granularity": "global"}


def test_the_seed_data_labels_the_prepared_tokens_and_derives_room_for_the_longest_answer(tmp_path, llama_dir):
    from pipeline.eval.data import seed_data
    from pipeline.eval.measures import longest_answer_tokens
    from pipeline.selection.token_labels import read_token_labels

    config = smoke_config(tmp_path / "out", llama_dir, max_new_tokens=None)
    data = seed_data(config, 0, llama_dir)
    assert data.max_new_tokens == longest_answer_tokens(llama_dir, data.heldout) + config.answer_margin
    assert data.max_new_tokens > 20 and data.samples == 8 and data.labelled
    labels = read_token_labels(data.labels)
    trainable = column_by_sample(data.tokenized, "tokenized", "trainable")
    assert set(labels) == set(trainable) and sum(int(d.sum()) for d in labels.values()) > 0
    assert all(len(labels[i]) == len(trainable[i]) and not (labels[i] & ~np.asarray(trainable[i])).any() for i in labels)
    again = seed_data(config, 0, llama_dir)  # a rerun rewrites nothing that matches
    assert again == data and read_token_labels(again.labels).keys() == labels.keys()


def test_a_missing_natural_corpus_is_one_line_before_any_model_runs(tmp_path, llama_dir, capsys):
    code = main(["eval", str(SMOKE), "--output", str(tmp_path / "out"), "--model", str(llama_dir), "--corpus", "natural",
                 "--methods", "full", "sstoken", "--natural.corpus", str(tmp_path / "nowhere.jsonl")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == f"sstoken eval: error: natural.corpus: {tmp_path / 'nowhere.jsonl'} does not exist"
    assert not (tmp_path / "out" / "cells").exists()


def test_spread_is_the_mean_and_sample_std_of_the_figures_that_are_there():
    assert spread([1.0, 2.0, 4.0]) == {"mean": 7 / 3, "std": pytest.approx(1.5275252), "n": 3}
    assert spread([0.5, None, float("nan")]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert spread([None]) == {"mean": None, "std": None, "n": 0}


def test_a_natural_corpus_runs_the_methods_for_held_out_nll_only(tmp_path, llama_dir, ray_local):
    corpus = tmp_path / "chats.jsonl"
    corpus.write_text("".join(
        f'{{"id": "c{i}", "prompt": "what is {i} plus {i}?", "response": "it is {2 * i} , the quick brown fox"}}\n'
        for i in range(14)
    ))
    config = smoke_config(tmp_path / "out", llama_dir, corpus="natural", methods=["sstoken"],
                          natural={"corpus": [corpus], "heldout": 4, "samples": 8})
    report = run_eval(config).report.as_json()
    assert [m["key"] for m in report["measures"]] == ["heldout_nll", "kept_tokens", "steps", "score_s", "train_s"]
    assert report["selection_by_round"] == [] and report["power"] == [] and report["ranking"] == {}
    assert report["verdict"].startswith("No oracle (a natural corpus has no known corrupted tokens)")
    rows = {r["method"]: r["values"] for r in report["table"]}
    assert set(rows) == {"base", "sstoken"} and all(rows[m]["heldout_nll"]["n"] == 1 for m in rows)
    assert rows["sstoken"]["heldout_nll"]["mean"] != rows["base"]["heldout_nll"]["mean"]
    # The seed's split: held out first, then the reference's rows, then training: all three disjoint.
    data = tmp_path / "out" / "data" / "seed-0"
    ids = {name: [json.loads(line)["id"] for line in (data / f"{name}.jsonl").read_text().splitlines()]
           for name in ("train", "heldout", "reference")}
    assert len(ids["heldout"]) == 4 and len(ids["train"]) == 8 and not set(ids["heldout"]) & set(ids["train"])
    assert not set(ids["reference"]) & (set(ids["train"]) | set(ids["heldout"])) and len(ids["reference"]) == 2


def test_eval_help_imports_no_torch_transformers_or_ray():
    script = (
        "import sys, contextlib, io\n"
        "from pipeline.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        "    try:\n"
        "        main(['eval', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "assert '--scale' in out.getvalue() and '--select.ratio' in out.getvalue()\n"
        "print(sorted(m for m in ('torch', 'transformers', 'ray', 'pyarrow') if m in sys.modules))\n"
    )
    repo = SMOKE.parents[2]
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_an_online_sstoken_cell_beside_the_offline_one_over_the_same_budget(tmp_path, llama_dir, ray_local):
    """sstoken_online: the same samples, optimizer steps and kept-token budget as sstoken; its selection measures pool
    the steps after the warm-up (as many samples as the offline warm-up slice), its score time the history's cache."""
    config = smoke_config(tmp_path / "out", llama_dir, methods=["oracle", "full", "sstoken", "sstoken_online"])
    rows = _rows(run_eval(config).report.as_json())
    for name in ("steps", "kept_tokens"):
        assert rows["sstoken_online"][name]["mean"] == rows["sstoken"][name]["mean"], name
    assert rows["sstoken_online"]["heldout_nll"]["mean"] > 0 and rows["sstoken_online"]["score_s"]["mean"] > 0
    assert rows["sstoken_online"]["auroc_within"]["n"] == 1  # measured over the steps after the warm-up
    record = json.loads(RunFolder(cell_folder(config, 0, "sstoken_online")).record.read_text())
    assert len(record["rounds"]) == 1 and record["rounds"][0]["masks"] == "rounds/r000/train/masks"
    assert record["config"]["train"]["online"]["warmup_samples"] == 4  # slice 0 of 8 samples
