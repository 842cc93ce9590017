"""The eval's records, typed: the schemas hold what the code writes; a malformed eval.json is one line in `report`."""

from __future__ import annotations

import json

import pytest

from pipeline.cli import main
from pipeline.eval.config import EvalConfig
from pipeline.eval.records import EVAL_SCHEMA, CellMeasures, read_eval, read_measures, write_measures
from pipeline.eval.table import build_report, markdown, write_eval
from pipeline.runtime.schemas import SchemaError, validate_json

CELL = {"schema_version": 2, "identity": "x", "seed": 0, "method": "sstoken", "wall_s": 3.5,
        "values": {"heldout_nll": 1.5, "exact_match": 0.25, "score_s": 2.0, "train_s": 4.0, "kept_tokens": 120,
                   "steps": 10, "corrupted_dropped": 0.8, "drop_share": 0.9, "auroc_within": 0.7, "auroc_pooled": None,
                   "auroc_within:filler": 0.75},
        "selection_by_round": [{"round": 0, "selection": "attn", "warmup": True, "measured": False,
                                "corrupted_dropped": 0.7, "drop_share": 0.8, "auroc_within": 0.6, "auroc_pooled": None}]}
BASE = {"schema_version": 2, "identity": "y", "seed": 0, "method": "base", "wall_s": 1.0,
        "values": {"heldout_nll": 2.0, "exact_match": 0.0}, "selection_by_round": []}


def _config(tmp_path) -> EvalConfig:
    return EvalConfig(model="smollm2-135m", output=tmp_path / "eval", methods=["oracle", "full", "sstoken"], seeds=[0])


def test_the_schemas_hold_the_records_the_code_writes(tmp_path):
    cells = [write_measures(tmp_path / "cells" / f"{c['method']}.measures.json", c) for c in (CELL, BASE)]
    assert read_measures(tmp_path / "cells" / "sstoken.measures.json") == cells[0]
    assert read_measures(tmp_path / "cells" / "nothing.measures.json") is None
    config = _config(tmp_path)
    (tmp_path / "eval").mkdir()
    report = write_eval(config, cells, wall_s=5.0, cells_run=2, max_new_tokens={"0": 60})
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    validate_json(written, EVAL_SCHEMA, "eval.json")
    assert read_eval(tmp_path / "eval") == report and report.as_json() == written
    assert build_report(config, cells, 5.0, 2, {"0": 60}) == written | {"config": written["config"]}
    assert written["kinds"] == ["filler"] and written["max_new_tokens"] == {"0": 60}
    assert not written["power"][0]["passes"] and "cannot tell methods apart" in written["verdict"]
    with pytest.raises(SchemaError, match="at values/auroc: 'high' is not of type 'number', 'null'"):
        write_measures(tmp_path / "bad.measures.json", CELL | {"values": {"auroc": "high"}})
    assert not (tmp_path / "bad.measures.json").exists()


@pytest.mark.parametrize("case, message", [
    ("not json", "is not an eval record (eval.json of `sstoken eval`): not readable as JSON"),
    ("folder", "is a folder, not an eval record"),
    ("missing key", "at (top level): 'table' is a required property"),
    ("wrong type", "at table/0/values/heldout_nll/n: 'two' is not of type 'integer'"),
])
def test_report_on_a_malformed_eval_json_says_so_in_one_line(tmp_path, capsys, case, message):
    folder = tmp_path / "eval"
    folder.mkdir()
    (folder / "eval.svg").write_text("<svg></svg>")
    report = {"kind": "eval", "schema_version": 2, "config": {}, "corpus": "task", "seeds": [0], "methods": ["full"],
              "rows": ["base", "full"], "measures": [{"key": "heldout_nll", "label": "held-out NLL", "higher_is_better": False}],
              "table": [{"method": "full", "values": {"heldout_nll": {"mean": 1.0, "std": 0.0, "n": 1}}}],
              "power": [], "spread_definition": "x", "verdict": "no oracle", "ranking": {}, "kinds": [],
              "max_new_tokens": {}, "selection_by_round": [], "wall_s": 1.0, "cells_wall_s": 1.0, "cells_run": 1}
    path = folder / "eval.json"
    if case == "not json":
        path.write_text("[1, 2")
    elif case == "folder":
        path.mkdir()
    elif case == "missing key":
        path.write_text(json.dumps({k: v for k, v in report.items() if k != "table"}))
    else:
        report["table"][0]["values"]["heldout_nll"]["n"] = "two"
        path.write_text(json.dumps(report))
    assert main(["report", str(folder), "--output", str(tmp_path / "page.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err, err
    assert not (tmp_path / "page.html").exists()


def _cell(method: str, seed: int, nll: float) -> CellMeasures:
    return CellMeasures.model_validate(BASE | {"identity": f"{method}{seed}", "seed": seed, "method": method,
                                              "values": {"heldout_nll": nll, "exact_match": 0.5}})


def test_rows_are_ranked_only_on_a_measure_that_passes_the_power_gate(tmp_path):
    config = EvalConfig(model="smollm2-135m", output=tmp_path / "eval", methods=["oracle", "full", "sstoken"],
                        seeds=[0, 1, 2])
    clear = [_cell("oracle", s, 1.0) for s in range(3)] + [_cell("full", s, 1.1 + 0.01 * s) for s in range(3)] + [
        _cell("sstoken", s, 1.05) for s in range(3)]
    report = build_report(config, clear, 1.0, 9)
    assert [g["passes"] for g in report["power"]] == [True, False]  # NLL separates, exact match (all 0.5) does not
    assert report["ranking"] == {"heldout_nll": ["oracle", "sstoken", "full"]}
    text = markdown(report)
    assert "Ranking by held-out NLL (the power gate passed), best first: oracle, sstoken, full." in text
    assert "Ranking by exact match" not in text and "exact match: cannot tell methods apart at this size" in text
    # the same means, a wide seed spread: nothing is ranked, and the verdict says so first
    noisy = [_cell("oracle", s, 1.0) for s in range(3)] + [_cell("full", s, (1.0, 1.1, 1.2)[s]) for s in range(3)] + [
        _cell("sstoken", s, 1.05) for s in range(3)]
    report = build_report(config, noisy, 1.0, 9)
    assert report["ranking"] == {} and not any(g["passes"] for g in report["power"])
    assert markdown(report).startswith("**Power gate failed") and "Ranking by" not in markdown(report)
