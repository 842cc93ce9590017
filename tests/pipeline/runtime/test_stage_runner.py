"""The one stage runner: the order of its steps, what it refuses before touching anything, what it may delete."""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pytest

import pipeline
from pipeline.runtime.files import ArtifactError, base_manifest, read_manifest
from pipeline.runtime.stage_output import PROGRESS, StageOutput, record_path
from pipeline.runtime.stage_runner import Stage, run_file_stage, run_stage


def _work(shards: dict[str, list[int]]):
    def work(out: StageOutput, _: object) -> dict:
        records = [out.done(name, name) or out.commit(name, pa.table({"x": values}), {"run_key": name})
                   for name, values in shards.items()]
        entries = [{key: r[key] for key in ("file", "rows", "sha256")} for r in records]
        return base_manifest("tokenized", {}) | {"shards": entries, "counts": {}}

    return work


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("where", ["rejected", "absolute", "shard"])
def test_a_manifest_naming_a_file_outside_its_folder_is_refused_and_nothing_outside_is_deleted(tmp_path, where):
    """Issue 20 item 1: a plain rerun used to delete `../victim.txt` (or an absolute path) that an old manifest
    listed, as one of its own files the new manifest no longer lists."""
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    victim.write_text("keep me")
    stage = Stage("tokenized", out, {"a": 1})
    run_stage(stage, _work({"part-00000.parquet": [1]}))
    manifest = json.loads((out / "manifest.json").read_text())
    name = {"rejected": "../victim.txt", "absolute": str(victim), "shard": "../victim.txt"}[where]
    entry = {"file": name, "rows": 0, "sha256": "0" * 64}
    if where == "shard":
        manifest["shards"].append(entry)
    else:
        manifest["rejected" if where == "rejected" else "extra"] = entry
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"which is not a file name inside its folder|does not match"):
        run_stage(stage, _work({"part-00000.parquet": [1]}))
    assert victim.read_text() == "keep me"
    run_stage(Stage("tokenized", out, {"a": 1}, overwrite=True), _work({"part-00000.parquet": [1]}))
    assert victim.read_text() == "keep me"
    assert read_manifest(out)["shards"][0]["file"] == "part-00000.parquet"


@pytest.mark.parametrize("name", ["..", ".", "_progress", "manifest.json"])
def test_a_progress_record_of_a_name_that_is_not_a_file_of_ours_deletes_nothing(tmp_path, name):
    out = tmp_path / "out"
    run_stage(Stage("tokenized", out, {"a": 1}), _work({"part-00000.parquet": [1]}))
    (out / PROGRESS / f"{name}.json").write_text("{}")
    (out / "manifest.json").unlink()  # a rerun that finishes: its cleanup reads the records
    run_stage(Stage("tokenized", out, {"a": 1}), _work({"part-00000.parquet": [1]}))
    assert tmp_path.is_dir() and (out / PROGRESS).is_dir() and (out / "manifest.json").is_file()


def test_an_input_inside_the_output_is_refused_too(tmp_path):
    """Issue 20 item 2's rule: the overlap check looks both ways (a model folder inside the output included)."""
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="the input .*model is inside the output folder"):
        run_stage(Stage("train", out, {"a": 1}, inputs=[out / "model"], overwrite=True), _work({}))
    assert _listing(out) == ["model"]


def test_a_refused_folder_is_left_exactly_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="did not write: notes.txt"):
        run_stage(Stage("tokenized", out, {"a": 1}), _work({"part-00000.parquet": [1]}))
    assert _listing(out) == ["notes.txt"]  # not even a lock file


def test_a_finished_output_is_reused_without_running_ready_or_work(tmp_path):
    stage = Stage("tokenized", tmp_path, {"a": 1})
    first = run_stage(stage, _work({"part-00000.parquet": [1]}))

    def never() -> None:
        raise AssertionError("ran")

    again = run_stage(stage, lambda out, _: never(), ready=never)
    assert again.reused and again.manifest == first.manifest
    assert not run_stage(stage, _work({"part-00000.parquet": [1]}), complete=lambda out, manifest: False).reused
    assert not run_stage(stage, _work({"part-00000.parquet": [1]}), reuse=False).reused


def test_ready_runs_before_anything_is_written(tmp_path):
    stage = Stage("tokenized", tmp_path, {"a": 1})
    run_stage(stage, _work({"part-00000.parquet": [1]}))
    seen = []

    @contextmanager
    def refused():
        seen.append((tmp_path / "manifest.json").is_file())
        raise ArtifactError("the cluster did not answer")
        yield

    with pytest.raises(ArtifactError, match="did not answer"):
        run_stage(stage, _work({}), ready=refused, reuse=False)
    assert seen == [True] and (tmp_path / "manifest.json").is_file()  # the finished output was not touched


def test_scratch_entries_go_once_the_output_is_complete(tmp_path):
    def work(out: StageOutput, _: None) -> dict:
        (out.folder / "state").mkdir()
        (out.folder / "state" / "step-1").write_text("resumable")
        return _work({})(out, None)

    run_stage(Stage("train", tmp_path, {"a": 1}, scratch=("state",)), work)
    assert _listing(tmp_path) == [".lock", PROGRESS, "manifest.json"]
    assert not record_path(tmp_path, "state").exists()


def test_a_foreign_entry_is_refused_with_overwrite_too(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("someone's log\n")
    with pytest.raises(ArtifactError, match="did not write: metrics.jsonl"):
        run_stage(Stage("train", tmp_path, {"a": 1}, entries=("metrics.jsonl",)), _work({}))
    with pytest.raises(ArtifactError, match="metrics.jsonl exists and was not written by sstoken train"):
        run_stage(Stage("train", tmp_path, {"a": 1}, overwrite=True, entries=("metrics.jsonl",)), _work({}))
    assert (tmp_path / "metrics.jsonl").read_text() == "someone's log\n"


def test_one_file_output_replaces_only_its_own_file_and_stays_out_of_its_inputs(tmp_path):
    mark = '<meta name="generator" content="sstoken report">'
    page = tmp_path / "page.html"
    made = []

    def make() -> str:
        made.append(1)
        return f"<html><head>{mark}</head>new</html>"

    page.write_text("my notes")
    with pytest.raises(ArtifactError, match="exists and is not an sstoken report; .*--overwrite"):
        run_file_stage("report", page, make, mark=mark, overwrite=False)
    with pytest.raises(ArtifactError, match="is a folder"):
        run_file_stage("report", tmp_path, make, mark=mark, overwrite=True)
    (tmp_path / "run").mkdir()
    with pytest.raises(ArtifactError, match="inside the input folder"):
        run_file_stage("report", tmp_path / "run" / "page.html", make, mark=mark, overwrite=True, inputs=[tmp_path / "run"])
    assert not made and page.read_text() == "my notes"
    run_file_stage("report", page, make, mark=mark, overwrite=True)
    page.write_text(f"<html><head>{mark}</head>old</html>")
    assert run_file_stage("report", page, make, mark=mark, overwrite=False) == len(page.read_bytes())
    assert "new" in page.read_text()


def test_only_the_runner_holds_the_protocol():
    """Stages supply identity and work; opening the output, begin, finish and skip-if-done live in runtime/."""
    package = Path(pipeline.__file__).resolve().parent
    protocol = re.compile(r"StageOutput\(|\.begin\(\)|\.finish\(|\.up_to_date\(|exclusive_output\(")
    found = [f"{path.relative_to(package)}: {match.group(0)}"
             for path in sorted(package.rglob("*.py")) if path.parts[-2] != "runtime"
             for match in protocol.finditer(path.read_text())]
    assert found == []
