"""The exactly-once output: skip-if-done, atomic commits with records, manifest last, ownership (through `run_stage`)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, base_manifest, read_manifest
from pipeline.runtime.stage_output import PROGRESS, StageOutput, StageSummary, record_path
from pipeline.runtime.stage_runner import Stage, run_stage


def _entry(record: dict) -> dict:
    return {key: record[key] for key in ("file", "rows", "sha256")}


def _run(folder: Path, shards: dict[str, list[int]], identity: dict | None = None, **options) -> dict:
    """One complete run: commit every shard not done under its key, then the manifest."""
    identity = identity or {"corpus": "a"}

    def work(out: StageOutput, _: None) -> dict:
        records = []
        for name, values in shards.items():
            key = json.dumps([identity, name])
            records.append(out.done(name, key) or out.commit(name, pa.table({"x": values}), {"run_key": key}))
        return base_manifest("tokenized", {}) | {"shards": [_entry(r) for r in records], "counts": {}}

    return run_stage(Stage("tokenized", folder, identity, **options), work).manifest


def test_commit_writes_the_file_and_its_record_and_done_validates_both(tmp_path):
    with StageOutput(tmp_path, "tokenized") as out:
        out.begin()
        record = out.commit("part-00000.parquet", pa.table({"x": [1, 2]}), {"run_key": "k", "extra": 1})
        assert record["rows"] == 2 and record["extra"] == 1 and record["file"] == "part-00000.parquet"
        assert json.loads(record_path(tmp_path, "part-00000.parquet").read_text()) == record
        assert out.done("part-00000.parquet", "k") == record
        assert out.done("part-00000.parquet", "another key") is None
        pq.write_table(pa.table({"x": [1, 2, 3]}), tmp_path / "part-00000.parquet")  # changed under its record
        assert out.done("part-00000.parquet", "k") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", PROGRESS, "part-00000.parquet"]


def test_a_record_is_written_before_the_rename(tmp_path, monkeypatch):
    """A kill between the rename and the record would leave a file nothing names: the record goes first."""
    import os

    replace = os.replace

    def killed_before_the_shard_rename(source, target):
        if str(target).endswith(".parquet"):
            raise KeyboardInterrupt  # the process dies here
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed_before_the_shard_rename)
    with StageOutput(tmp_path, "tokenized") as out:
        out.begin()
        with pytest.raises(KeyboardInterrupt):
            out.commit("part-00000.parquet", pa.table({"x": [1]}), {"run_key": "k"})
    assert record_path(tmp_path, "part-00000.parquet").is_file() and not (tmp_path / "part-00000.parquet").exists()
    monkeypatch.undo()
    assert _run(tmp_path, {"part-00000.parquet": [1]})["shards"][0]["rows"] == 1  # its own file: no refusal


def test_manifest_is_absent_during_a_run_and_written_last(tmp_path):
    _run(tmp_path, {"part-00000.parquet": [1]})
    with StageOutput(tmp_path, "tokenized", identity={"corpus": "a"}) as out:
        assert out.up_to_date() is not None
        out.begin()
        assert not (tmp_path / "manifest.json").exists()


def test_rerun_skips_done_shards_and_removes_its_own_unlisted_ones(tmp_path):
    _run(tmp_path, {"part-00000.parquet": [1], "part-00001.parquet": [2]})
    before = (tmp_path / "part-00000.parquet").stat().st_mtime_ns
    assert _run(tmp_path, {"part-00000.parquet": [1]}) == read_manifest(tmp_path)  # complete: reused, nothing runs
    assert (tmp_path / "part-00001.parquet").exists()
    (tmp_path / "manifest.json").unlink()  # as a kill before the manifest leaves it
    manifest = _run(tmp_path, {"part-00000.parquet": [1]})  # same identity, one shard fewer
    assert (tmp_path / "part-00000.parquet").stat().st_mtime_ns == before  # skipped, not rewritten
    assert not (tmp_path / "part-00001.parquet").exists() and not record_path(tmp_path, "part-00001.parquet").exists()
    assert read_manifest(tmp_path)["run_identity"] == manifest["run_identity"]


def test_foreign_files_are_refused_by_name_and_never_deleted(tmp_path):
    (tmp_path / "part-00007-3f1c.parquet").write_bytes(b"a user's file")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match=r"did not write: notes.txt, part-00007-3f1c.parquet; .*--overwrite"):
        _run(tmp_path, {"part-00000.parquet": [1]})
    assert not (tmp_path / PROGRESS).exists()
    _run(tmp_path, {"part-00000.parquet": [1]}, overwrite=True)
    assert (tmp_path / "part-00007-3f1c.parquet").read_bytes() == b"a user's file"
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_finished_output_of_other_inputs_needs_overwrite(tmp_path):
    _run(tmp_path, {"part-00000.parquet": [1]})
    with pytest.raises(ArtifactError, match="made from other inputs or settings; pass --overwrite"):
        _run(tmp_path, {"part-00000.parquet": [2]}, identity={"corpus": "b"})
    _run(tmp_path, {"part-00000.parquet": [2]}, identity={"corpus": "b"}, overwrite=True)
    assert pq.read_table(tmp_path / "part-00000.parquet").column("x").to_pylist() == [2]


def test_another_kind_or_an_unreadable_manifest_is_refused(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps(base_manifest("scores", {}) | {"shards": [], "counts": {}}))
    with pytest.raises(ArtifactError, match="holds a 'scores' artifact, not tokenized"):
        _run(tmp_path, {"part-00000.parquet": [1]})
    (tmp_path / "manifest.json").write_text("[1, 2]")
    with pytest.raises(ArtifactError, match=r"manifest.json is not a manifest: it holds a JSON list"):
        _run(tmp_path, {"part-00000.parquet": [1]})


@pytest.mark.parametrize("where", ["same", "inside", "file"])
def test_an_output_in_an_input_folder_is_refused_before_anything_is_touched(tmp_path, where):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "part-00000.parquet").write_bytes(b"spark export")
    output = {"same": corpus, "inside": corpus / "out", "file": corpus}[where]
    inputs = [corpus / "part-00000.parquet"] if where == "file" else [corpus]
    with pytest.raises(ArtifactError, match="choose an output folder outside the inputs"):
        _run(output, {"part-00000.parquet": [1]}, inputs=inputs, overwrite=True)
    assert sorted(p.name for p in corpus.iterdir()) == ["part-00000.parquet"]


def test_summary_is_json_ready(tmp_path):
    summary = StageSummary("prepare", tmp_path, counts={"rows_read": 3}, notes=["x"], details={"path": tmp_path})
    assert json.loads(json.dumps(summary.as_dict()))["details"] == {"path": str(tmp_path)}


def test_refusals_are_user_errors():
    assert issubclass(ArtifactError, UserError)


def test_entries_are_claimed_before_the_work_and_kept_by_finish(tmp_path):
    def work(out: StageOutput, _: None) -> dict:
        assert json.loads(record_path(tmp_path, "checkpoint").read_text())["file"] == "checkpoint"  # claimed already
        out.record_entry("checkpoint", {"note": 1})
        (tmp_path / "checkpoint").mkdir(exist_ok=True)
        (tmp_path / "checkpoint" / "weights").write_text("w")
        return base_manifest("tokenized", {}) | {"shards": [], "counts": {}}

    stage = Stage("tokenized", tmp_path, {"a": 1}, entries=("checkpoint", "log.txt"))
    run_stage(stage, work)
    (tmp_path / "manifest.json").unlink()  # as a kill before the manifest leaves it
    run_stage(stage, work)  # a rerun: the claimed folder is ours, not a foreign file
    assert (tmp_path / "checkpoint" / "weights").read_text() == "w"  # finish never removes an entry
    record = json.loads(record_path(tmp_path, "checkpoint").read_text())
    assert record["note"] == 1 and record["file"] == "checkpoint"
    with StageOutput(tmp_path, "tokenized", entries=("checkpoint",)) as out:
        with pytest.raises(ValueError, match="other is not one of this output's entries"):
            out.record_entry("other", {})
