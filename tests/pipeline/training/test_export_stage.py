"""`sstoken export`: the rows every format holds, the labels the masks give, the counts, reuse and the refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.runtime.config import load_config
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, read_manifest
from pipeline.training.export_stage import ExportConfig, run_export
from tests.factories import write_keep_masks, write_tokenized

SHARDS = [5, 4]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, SHARDS, seed=3)


@pytest.fixture(scope="module")
def masks(tmp_path_factory, tokenized) -> Path:
    """Keep masks of `tokenized` with a low ratio, so that some samples keep no token."""
    return write_keep_masks(tmp_path_factory.mktemp("masks"), tokenized, ratio=0.08, seed=2)


def _truth(tokenized: Path, masks: Path) -> dict[str, dict]:
    """Per sample id, straight from the files: ids, source, keep and the labels a reader expects."""
    rows = {}
    for shard in read_manifest(tokenized)["shards"]:
        for row in pq.read_table(tokenized / shard["file"]).to_pylist():
            rows[row["sample_id"]] = row
    for shard in read_manifest(masks)["shards"]:
        for row in pq.read_table(masks / shard["file"], columns=["sample_id", "keep"]).to_pylist():
            ids = rows[row["sample_id"]]["input_ids"]
            rows[row["sample_id"]]["labels"] = [-100] + [t if k else -100 for t, k in zip(ids[1:], row["keep"][1:])]
    return rows


def _exported_rows(folder: Path, fmt: str) -> list[dict]:
    if fmt == "hf":
        import datasets

        return list(datasets.load_from_disk(str(folder)))
    files = [folder / s["file"] for s in read_manifest(folder, kind="export")["shards"]]
    if fmt == "jsonl":
        return [json.loads(line) for f in files for line in f.read_text().splitlines()]
    return [row for f in files for row in pq.read_table(f).to_pylist()]


@pytest.mark.parametrize("fmt", ["hf", "jsonl", "parquet"])
def test_every_format_holds_the_kept_tokens_as_labels(tokenized, masks, tmp_path, fmt):
    summary = run_export(ExportConfig(data=tokenized, masks=masks, format=fmt, output=tmp_path / "out"))
    truth = _truth(tokenized, masks)
    rows = _exported_rows(tmp_path / "out", fmt)
    with_kept = {sid for sid, row in truth.items() if any(label != -100 for label in row["labels"])}
    assert 0 < len(with_kept) < len(truth)  # the fixture leaves some samples without a kept token
    assert [row["sample_id"] for row in rows] == [sid for sid in truth if sid in with_kept]  # tokenized order
    for row in rows:
        expected = truth[row["sample_id"]]
        assert row["input_ids"] == expected["input_ids"] and row["source"] == expected["source"]
        assert row["labels"] == expected["labels"] and row["labels"][0] == -100
        assert row["attention_mask"] == [1] * len(row["input_ids"]) and row["n_tokens"] == len(row["input_ids"])
        assert row["n_kept"] == sum(label != -100 for label in row["labels"])
    counts = summary.counts
    assert counts["samples_in"] == sum(SHARDS) == counts["exported"] + counts["skipped_without_kept"]
    assert counts["exported"] == len(with_kept) and counts["labels"] == sum(r["n_kept"] for r in rows)
    assert summary.notes and "keep no token" in summary.notes[0]
    manifest = read_manifest(tmp_path / "out", kind="export")
    assert manifest["format"] == fmt and manifest["counts"] == {k: v for k, v in counts.items() if k != "files_written"}
    assert [i["kind"] for i in manifest["inputs"]] == ["tokenized", "scores"]
    assert manifest["tokenizer"] == read_manifest(tokenized)["tokenizer"]


def test_samples_without_a_kept_token_can_be_kept_with_no_label(tokenized, masks, tmp_path):
    summary = run_export(ExportConfig(data=tokenized, masks=masks, format="parquet", output=tmp_path / "out",
                                      without_kept="keep"))
    rows = _exported_rows(tmp_path / "out", "parquet")
    assert summary.counts["exported"] == len(rows) == sum(SHARDS) and summary.counts["skipped_without_kept"] == 0
    assert any(all(label == -100 for label in row["labels"]) for row in rows)
    assert not summary.notes


def test_a_rerun_reuses_the_export_and_a_killed_one_redoes_only_what_is_missing(tokenized, masks, tmp_path):
    config = ExportConfig(data=tokenized, masks=masks, format="jsonl", output=tmp_path / "out")
    first = run_export(config)
    assert first.counts["files_written"] == len(SHARDS) and not first.reused
    rows = _exported_rows(tmp_path / "out", "jsonl")
    assert run_export(config).reused
    (tmp_path / "out" / "manifest.json").unlink()  # as a kill before the manifest leaves it
    (tmp_path / "out" / "part-00001.jsonl").unlink()
    again = run_export(config)
    assert again.counts["files_written"] == 1 and not again.reused
    assert _exported_rows(tmp_path / "out", "jsonl") == rows
    assert again.counts["exported"] == first.counts["exported"]


def test_another_format_in_the_same_folder_needs_overwrite_and_replaces_only_our_files(tokenized, masks, tmp_path):
    out = tmp_path / "out"
    run_export(ExportConfig(data=tokenized, masks=masks, format="parquet", output=out))
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already holds a export artifact made from other inputs or settings"):
        run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=out))
    run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=out, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(out.glob("*.parquet")) and (out / "state.json").is_file()
    assert len(_exported_rows(out, "hf")) == read_manifest(out)["counts"]["exported"]


def test_masks_of_other_data_or_another_tokenizer_are_refused(tokenizer, tokenized, tmp_path):
    other = write_tokenized(tmp_path / "other", tokenizer, SHARDS, seed=9)
    foreign = write_keep_masks(tmp_path / "foreign", other, ratio=0.5)
    with pytest.raises(ArtifactError, match="was made from other tokenized data"):
        run_export(ExportConfig(data=tokenized, masks=foreign, format="hf", output=tmp_path / "out"))
    retokenized = tmp_path / "retokenized"
    shutil.copytree(tokenized, retokenized)
    manifest = json.loads((retokenized / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (retokenized / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="was made with another tokenizer"):
        run_export(ExportConfig(data=retokenized, masks=write_keep_masks(tmp_path / "m", tokenized), format="hf",
                                output=tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.parametrize("where", ["position 0", "prompt"])
def test_train_and_export_refuse_masks_keeping_a_token_that_is_no_target(tokenized, tmp_path, capsys, where, llama_dir):
    from pipeline.cli import main

    edited = write_keep_masks(tmp_path / "masks", tokenized, keep_off_targets=where)
    for command in (["export", "--format", "jsonl"], ["train", "--model", str(llama_dir), "--ray.runner", "process"]):
        arguments = [*command, "--data", str(tokenized), "--masks", str(edited), "--output", str(tmp_path / command[0])]
        assert main(arguments) == 2
        (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sstoken")]
        assert f"{edited} keeps or weighs tokens against the alignment contract of {tokenized}" in err
        assert not (tmp_path / command[0] / "manifest.json").exists()
    # validate flags such folders too (test_validate_stage: "keep at position 0", "keep off trainable").


def test_files_of_others_are_refused_and_never_removed(tokenized, masks, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000.parquet").write_text("someone else's")
    with pytest.raises(ArtifactError, match="holds files this stage did not write: part-00000.parquet"):
        run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=out))
    assert (out / "part-00000.parquet").read_text() == "someone else's"
    (out / "state.json").write_text("{}")
    with pytest.raises(ArtifactError, match="did not write: part-00000.parquet, state.json"):
        run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=out))


def test_bad_paths_and_settings_are_refused_by_name(tokenized, masks, tmp_path):
    with pytest.raises(ArtifactError, match=f"tokenized data folder {tmp_path / 'nope'} does not exist"):
        run_export(ExportConfig(data=tmp_path / "nope", masks=masks, format="hf", output=tmp_path / "out"))
    with pytest.raises(ArtifactError, match=f"masks folder {tmp_path / 'gone'} does not exist"):
        run_export(ExportConfig(data=tokenized, masks=tmp_path / "gone", format="hf", output=tmp_path / "out"))
    with pytest.raises(ArtifactError, match="is inside the input folder"):
        run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=masks / "export"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="is a file"):
        run_export(ExportConfig(data=tokenized, masks=masks, format="hf", output=tmp_path / "file"))
    with pytest.raises(UserError, match="format"):
        load_config(ExportConfig, overrides={"data": tokenized, "masks": masks, "format": "csv", "output": tmp_path})


def test_masks_that_keep_nothing_are_refused_unless_kept(tokenized, tmp_path):
    empty = write_keep_masks(tmp_path / "empty", tokenized, ratio=0.0)
    with pytest.raises(ArtifactError, match="keeps any token .*nothing to export"):
        run_export(ExportConfig(data=tokenized, masks=empty, format="parquet", output=tmp_path / "out"))
    summary = run_export(ExportConfig(data=tokenized, masks=empty, format="parquet", output=tmp_path / "out",
                                      without_kept="keep"))
    assert summary.counts["exported"] == sum(SHARDS) and summary.counts["labels"] == 0


def test_an_hf_export_is_reused_and_a_killed_one_is_written_again(tokenized, masks, tmp_path):
    config = ExportConfig(data=tokenized, masks=masks, format="hf", output=tmp_path / "out")
    first = run_export(config)
    rows = _exported_rows(tmp_path / "out", "hf")
    assert run_export(config).reused
    (tmp_path / "out" / "manifest.json").unlink()  # killed after datasets wrote its files: they are ours
    (tmp_path / "out" / "data-00001-of-00002.arrow").write_bytes(b"half a file")
    again = run_export(config)
    assert not again.reused and again.counts["files_written"] == first.counts["files_written"] == len(SHARDS)
    assert _exported_rows(tmp_path / "out", "hf") == rows
    (tmp_path / "out" / "state.json").unlink()  # the folder no longer opens: not reused, written again
    assert not run_export(config).reused and _exported_rows(tmp_path / "out", "hf") == rows
