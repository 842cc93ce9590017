"""run.json, typed: the schema holds what the loop writes; a malformed record is one line naming the file and the field."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.cli import main
from pipeline.loop.run_folder import RUN_SCHEMA, RunFolder, read_run_record
from pipeline.runtime.files import ArtifactError
from pipeline.runtime.schemas import SchemaError, validate_json
from tests.score_factories import write_synthetic_run


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer_dir):
    return write_synthetic_run(tmp_path_factory.mktemp("run") / "run", tokenizer_dir, samples=6, rounds=2)


def test_the_record_reads_back_typed(run):
    record = read_run_record(RunFolder(run))
    assert [entry.round for entry in record.rounds] == [0, 1] and record.rounds[1].summary.kept_ratio == 0.6
    assert record.as_json() == json.loads((run / "run.json").read_text())
    validate_json(record.as_json(), RUN_SCHEMA, "run.json")


@pytest.mark.parametrize("value, where", [
    ("../outside", "a round's data"), ("/etc", "a round's data"), ("rounds/../../x", "a round's data"),
])
def test_a_folder_the_record_names_must_stay_inside_the_run(run, tmp_path, value, where):
    folder = RunFolder(run)
    with pytest.raises(ArtifactError, match="which is not a folder inside the run"):
        folder.inside(value, where)
    record = json.loads((run / "run.json").read_text())
    record["rounds"][0]["data"] = value
    copy = shutil.copytree(run, tmp_path / "copy")
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(SchemaError, match="does not match run.v1.schema.json at rounds/0/data"):
        read_run_record(RunFolder(copy))


def _malformed(run_json, case: str) -> str:
    """Make run.json malformed; the field the error must name."""
    record = json.loads(run_json.read_text())
    if case == "not json":
        run_json.write_text("{not json")
        return "not readable as JSON"
    if case == "folder":
        run_json.unlink()
        run_json.mkdir()
        return "is a folder, not a run record"
    if case == "missing key":
        del record["rounds"][1]["summary"]
        run_json.write_text(json.dumps(record))
        return "at rounds/1: 'summary' is a required property"
    record["rounds"][0]["round"] = "first"
    run_json.write_text(json.dumps(record))
    return "at rounds/0/round: 'first' is not of type 'integer'"


@pytest.mark.parametrize("command", ["report", "inspect"])
@pytest.mark.parametrize("case", ["not json", "folder", "missing key", "wrong type"])
def test_report_and_inspect_on_a_malformed_run_json_say_so_in_one_line(run, tmp_path, capsys, command, case):
    copy = shutil.copytree(run, tmp_path / "copy")
    message = _malformed(copy / "run.json", case)
    args = [command, str(copy)] + (["--output", str(tmp_path / "page.html")] if command == "report" else ["--top", "1"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(copy / "run.json") in err and message in err, err
