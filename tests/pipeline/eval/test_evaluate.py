"""`sstoken eval` at the smoke size (jobs/configs/eval.smoke.yaml on a tiny model): the harness, not the science.

One eval shared by the tests here (a module fixture): every method, one seed, two rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.eval.config import ALL_METHODS, EvalConfig
from pipeline.eval.evaluate import cell_folder, measures_path, run_eval
from pipeline.eval.records import EVAL_SCHEMA, MEASURES_SCHEMA, read_eval, read_measures
from pipeline.eval.table import spread
from pipeline.loop.run_folder import RunFolder
from pipeline.runtime.config import load_config
from pipeline.runtime.errors import UserError
from pipeline.runtime.schemas import validate_json

SMOKE = Path(__file__).resolve().parents[3] / "jobs" / "configs" / "eval.smoke.yaml"


def smoke_config(output: Path, model: Path, **overrides) -> EvalConfig:
    return load_config(EvalConfig, SMOKE, {"output": output, "model": str(model)} | overrides)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, llama_dir, ray_local):
    config = smoke_config(tmp_path_factory.mktemp("eval") / "out", llama_dir)
    return config, run_eval(config)


def test_every_method_over_every_seed_in_eval_json(evaluated):
    config, result = evaluated
    report = json.loads((config.output / "eval.json").read_text())
    assert report == result.report.as_json() and read_eval(config.output) == result.report
    validate_json(report, EVAL_SCHEMA, "eval.json")  # the schemas hold the records the eval wrote
    for path in (config.output / "cells").glob("seed-*/*.measures.json"):
        validate_json(json.loads(path.read_text()), MEASURES_SCHEMA, str(path))
        assert read_measures(path).as_json() == json.loads(path.read_text())
    assert report["kind"] == "eval" and report["schema_version"] == 1
    assert report["methods"] == list(ALL_METHODS) and [r["method"] for r in report["table"]] == ["base", *ALL_METHODS]
    keys = [m["key"] for m in report["measures"]]
    assert keys[:5] == ["heldout_nll", "exact_match", "corrupted_dropped", "clean_dropped", "auroc"]
    rows = {r["method"]: r["values"] for r in report["table"]}
    for method in ALL_METHODS:
        assert rows[method]["heldout_nll"]["n"] == 1 and rows[method]["heldout_nll"]["mean"] > 0
        assert rows[method]["train_s"]["mean"] > 0 and rows[method]["score_s"]["mean"] > 0
        assert 0 <= rows[method]["exact_match"]["mean"] <= 1
    # The base row: the untrained model's held-out figures only.
    assert set(rows["base"]) == {"heldout_nll", "exact_match"}
    # full keeps every token: it drops nothing; every other method drops about half the tokens.
    assert rows["full"]["corrupted_dropped"]["mean"] == rows["full"]["clean_dropped"]["mean"] == 0.0
    for method in set(ALL_METHODS) - {"full"}:
        dropped = rows[method]["clean_dropped"]["mean"]
        assert 0.3 < dropped < 0.7, (method, dropped)
    # Per round, for every method: the round-0 warm-up of the REL-only and sstoken methods is attention.
    rounds = {(e["method"], e["round"]): e for e in report["selection_by_round"]}
    assert set(rounds) == {(m, r) for m in ALL_METHODS for r in (0, 1)}
    assert rounds["sstoken", 0]["selection"] == "attn" and rounds["sstoken", 1]["selection"] == "sstoken"
    assert rounds["rho1", 0]["selection"] == "rho1"
    assert all(e["corrupted_dropped"]["n"] == 1 for e in rounds.values())
    assert rounds["attn", 1]["auroc"]["n"] == 1 and 0 <= rounds["attn", 1]["auroc"]["mean"] <= 1


def test_the_budget_of_kept_tokens_seen_is_the_same_for_full(evaluated):
    config, result = evaluated
    rows = {r["method"]: r["values"] for r in result.report.as_json()["table"]}
    full, sstoken = rows["full"]["kept_tokens"]["mean"], rows["sstoken"]["kept_tokens"]["mean"]
    assert 0.6 < full / sstoken < 1.6
    record = json.loads(RunFolder(cell_folder(config, 0, "full")).record.read_text())
    assert record["rounds"][0]["summary"]["kept_ratio"] == 1.0
    assert record["config"]["train"]["epochs"] == config.select.ratio


def test_markdown_table_and_plot(evaluated):
    config, _ = evaluated
    text = (config.output / "eval.md").read_text()
    for method in ALL_METHODS:
        assert f"| {method} | " in text
    assert "held-out NLL ↓" in text and "| sstoken | 1 | sstoken |" in text
    svg = (config.output / "eval.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg


def test_a_second_call_redoes_nothing_and_a_cell_killed_before_its_measures_is_measured_again(evaluated):
    config, result = evaluated
    files = sorted((config.output / "cells").glob("seed-*/*.measures.json"))
    assert len(files) == len(ALL_METHODS) + 2  # every method, the reference and the base, per seed
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


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"methods": ["sstoken", "rho2"]}, "methods.1: Input should be 'sstoken', 'rel'"),
        ({"methods": ["rel", "rel"]}, "rel given more than once"),
        ({"methods": []}, "give at least one method"),
        ({"seeds": [0, 0]}, "seeds must be distinct"),
        ({"seeds": [-1]}, "seeds must be non-negative"),
        ({"seeds": []}, "give at least one seed"),
        ({"scale": 0}, "scale: Input should be greater than 0"),
        ({"task": {"train": 4}}, "task.train gives 4 samples a seed"),
        ({"select": {"method": "rel"}}, "select.method cannot be set"),
        ({"train": {"epochs": 2}}, "train.epochs cannot be set"),
        ({"score": {"runner": "ray"}}, "score.runner cannot be set in a stage section: set ray.runner in the ray: section"),
    ],
)
def test_bad_settings_are_refused_by_name(tmp_path, llama_dir, overrides, message):
    with pytest.raises(UserError, match=message.replace("(", "\\(").replace(".", "\\.")):
        smoke_config(tmp_path / "out", llama_dir, **overrides)


def test_the_ray_section_reaches_every_stage_of_every_cell(tmp_path, llama_dir):
    from pipeline.eval.data import SeedData
    from pipeline.eval.evaluate import cell_run_config, reference_run_config
    from pipeline.runtime.ray_settings import RaySettings

    assert smoke_config(tmp_path / "out", llama_dir).ray == RaySettings(runner="process")  # the eval's default
    config = smoke_config(tmp_path / "out", llama_dir, ray={"address": "10.0.0.1:6379", "runner": "ray", "num_cpus": 2})
    data = SeedData(0, tmp_path / "train.jsonl", tmp_path / "heldout.jsonl", tmp_path / "reference.jsonl", labelled=True)
    runs = [cell_run_config(config, data, method, tmp_path / "ref") for method in config.methods]
    for run in [*runs, reference_run_config(config, data)]:
        assert run.ray == run.score.ray == run.train.ray == config.ray


def test_a_missing_natural_corpus_is_one_line_before_any_model_runs(tmp_path, llama_dir, capsys):
    code = main(["eval", str(SMOKE), "--output", str(tmp_path / "out"), "--model", str(llama_dir), "--corpus", "natural",
                 "--natural.corpus", str(tmp_path / "nowhere.jsonl")])
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
    assert [m["key"] for m in report["measures"]] == ["heldout_nll", "score_s", "train_s", "kept_tokens"]
    assert report["selection_by_round"] == []
    rows = {r["method"]: r["values"] for r in report["table"]}
    assert set(rows) == {"base", "sstoken"} and all(rows[m]["heldout_nll"]["n"] == 1 for m in rows)
    assert rows["sstoken"]["heldout_nll"]["mean"] != rows["base"]["heldout_nll"]["mean"]
    # The seed's split: held out first, disjoint from training; the reference slice is training rows.
    data = tmp_path / "out" / "data" / "seed-0"
    ids = {name: [json.loads(line)["id"] for line in (data / f"{name}.jsonl").read_text().splitlines()]
           for name in ("train", "heldout", "reference")}
    assert len(ids["heldout"]) == 4 and len(ids["train"]) == 8 and not set(ids["heldout"]) & set(ids["train"])
    assert set(ids["reference"]) <= set(ids["train"]) and len(ids["reference"]) == 2


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
