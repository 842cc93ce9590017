"""The prepare stage end to end on a corpus mixing every row shape and every bad case."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.data.chat import TemplateError
from pipeline.data.prepare_stage import PrepareConfig, run_prepare
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import ArtifactError, exclusive_output, read_manifest, read_shard, verify_shards
from tests import tiny

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]
LONG_ANSWER = "The quick brown fox jumps over the lazy dog. " * 40


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_bytes(b"".join(r if isinstance(r, bytes) else json.dumps(r).encode() + b"\n" for r in rows))
    return path


@pytest.fixture
def mixed_corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_jsonl(folder / "chat.jsonl", [
        {"messages": MULTI_TURN, "source": "handmade"},                                 # line 1 ok, 2 turns
        {"prompt": "What is 2+2?", "response": "4"},                                    # line 2 ok
        b"{this is not json\n",                                                         # line 3 invalid_json
        {"prompt": "x", "respone": "y"},                                                # line 4 missing (misspelled)
        {"question": "x"},                                                              # line 5 missing
        {"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},  # 6 unknown_role
        {"prompt": "", "response": "y"},                                                # line 7 empty content
        {"prompt": "x", "response": ["y"]},                                             # line 8 non-string content
        {"messages": [{"role": "user", "content": "Hi"}]},                              # line 9 no assistant
        b'{"prompt": "caf\xe9", "response": "y"}\n',                                    # line 10 undecodable
        {"prompt": "What is 2+2?", "response": "4"},                                    # line 11 duplicate of line 2
        {"prompt": "Tell me a story.", "response": LONG_ANSWER},                        # line 12 over-length
    ])
    (folder / "alpaca.json").write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "output": "Hi!"},
    ]))
    pq.write_table(pa.Table.from_pylist([{"prompt": "Name a colour.", "completion": "Blue."}]), folder / "pc.parquet")
    (folder / "empty.jsonl").write_text("")
    return folder


def prepare(corpus, tokenizer_dir, output, **settings):
    config = PrepareConfig(input=[corpus], tokenizer=str(tokenizer_dir), output=output, **settings)
    return run_prepare(config)


def rejections_by_place(output: Path) -> dict[tuple[str, str], str]:
    """{(input file name, locator): reason} of every row in rejected.parquet."""
    rejected = pl.read_parquet(output / "rejected.parquet")
    return {(Path(r["input_file"]).name, r["locator"]): r["reason"] for r in rejected.iter_rows(named=True)}


def read_corpus(output: Path) -> pl.DataFrame:
    manifest = read_manifest(output, kind="tokenized")
    return pl.concat([pl.from_arrow(read_shard(output / s["file"], "tokenized")) for s in manifest["shards"]])


def test_mixed_corpus_counts_masks_and_rejections(mixed_corpus, tokenizer_dir, tokenizer, tmp_path):
    output = tmp_path / "out"
    summary = prepare(mixed_corpus, tokenizer_dir, output, max_length=64, on_overflow="reject", rows_per_shard=2)

    assert summary.counts['rows_read'] == 15
    assert (summary.counts['rows_written'], summary.counts['rows_rejected']) == (5, 10)
    assert summary.counts['rows_read'] == summary.counts['rows_written'] + summary.counts['rows_rejected']
    by_line = rejections_by_place(output)
    assert by_line == {
        ("chat.jsonl", "line 3"): "invalid_json",
        ("chat.jsonl", "line 4"): "missing_fields",
        ("chat.jsonl", "line 5"): "missing_fields",
        ("chat.jsonl", "line 6"): "unknown_role",
        ("chat.jsonl", "line 7"): "bad_content",
        ("chat.jsonl", "line 8"): "bad_content",
        ("chat.jsonl", "line 9"): "no_assistant_turn",
        ("chat.jsonl", "line 10"): "undecodable_bytes",
        ("chat.jsonl", "line 11"): "duplicate",
        ("chat.jsonl", "line 12"): "too_long",
    }
    rejected = pl.read_parquet(output / "rejected.parquet")
    assert all(rejected["detail"].str.len_chars() > 0)
    assert rejected.filter(pl.col("reason") == "duplicate")["sample_id"].item() is not None

    manifest = read_manifest(output, kind="tokenized")
    verify_shards(output, manifest)
    assert [s["file"] for s in manifest["shards"]] == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert manifest["counts"]["rows_read"] == 15 and manifest["counts"]["duplicates"] == 1
    assert manifest["tokenizer"]["fingerprint"] and manifest["tokenizer"]["chat_template_fingerprint"]
    assert manifest["config"]["max_length"] == 64
    assert summary.details['inputs_without_rows'] == [f"{mixed_corpus / 'empty.jsonl'} (empty)"]

    corpus = read_corpus(output)
    assert corpus.height == 5 and corpus["sample_id"].n_unique() == 5
    assert set(corpus["source"]) == {"handmade", "chat.jsonl", "alpaca.json", "pc.parquet"}
    for row in corpus.iter_rows(named=True):
        assert len(row["trainable"]) == len(row["input_ids"]) == row["n_tokens"]
        assert row["trainable"][0] is False and sum(row["trainable"]) == row["n_trainable"]
    multi = corpus.filter(pl.col("source") == "handmade").row(0, named=True)
    kept = [t for t, f in zip(tokenizer.convert_ids_to_tokens(multi["input_ids"]), multi["trainable"]) if f]
    assert kept == ["H", "el", "lo", "!", "<|im_end|>", "Pa", "ris", ".", "<|im_end|>"] and multi["n_turns"] == 2


def test_truncate_keeps_the_head_and_rejects_samples_left_without_targets(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [
        {"prompt": "Tell me a story.", "response": LONG_ANSWER},
        {"prompt": LONG_ANSWER, "response": "Ok."},
    ])
    summary = prepare(corpus, tokenizer_dir, tmp_path / "out", max_length=32, on_overflow="truncate")
    assert (summary.counts['rows_written'], summary.counts['rows_rejected']) == (1, 1)
    row = read_corpus(tmp_path / "out").row(0, named=True)
    assert row["n_tokens"] == 32 and row["truncated"] and row["n_trainable"] > 0
    reasons = pl.read_parquet(tmp_path / "out" / "rejected.parquet")["reason"].to_list()
    assert reasons == ["no_trainable_after_truncation"]


def test_unique_id_column_becomes_sample_id_else_content_hash(tmp_path, tokenizer_dir):
    unique = write_jsonl(tmp_path / "u.jsonl", [{"id": "a", "prompt": "Q1", "response": "A"},
                                                {"id": "b", "prompt": "Q2", "response": "A"}])
    prepare(unique, tokenizer_dir, tmp_path / "u")
    assert read_corpus(tmp_path / "u")["sample_id"].to_list() == ["a", "b"]
    repeated = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "prompt": "Q1", "response": "A"},
                                                  {"id": "a", "prompt": "Q2", "response": "A"}])
    prepare(repeated, tokenizer_dir, tmp_path / "r")
    ids = read_corpus(tmp_path / "r")["sample_id"].to_list()
    assert len(set(ids)) == 2 and all(i.startswith("sha256:") for i in ids)
    assert read_manifest(tmp_path / "r")["id_policy"] == "content hash"


def test_rerun_reuses_a_valid_output_and_redoes_an_incomplete_one(tmp_path, tokenizer_dir, mixed_corpus):
    output = tmp_path / "out"
    prepare(mixed_corpus, tokenizer_dir, output)
    first = (output / "part-00000.parquet").read_bytes()
    assert prepare(mixed_corpus, tokenizer_dir, output).reused
    # A run killed before its manifest: the leftovers are cleared and the corpus rebuilt identically.
    (output / "manifest.json").unlink()
    (output / ".part-00001.parquet.tmp-1-dead").write_bytes(b"half")
    summary = prepare(mixed_corpus, tokenizer_dir, output)
    assert not summary.reused and (output / "part-00000.parquet").read_bytes() == first
    assert not list(output.glob(".*.tmp-*"))


def test_a_different_corpus_is_not_written_over_without_overwrite(tmp_path, tokenizer_dir, mixed_corpus):
    output = tmp_path / "out"
    prepare(mixed_corpus, tokenizer_dir, output)
    with pytest.raises(ArtifactError, match="pass --overwrite"):
        prepare(mixed_corpus, tokenizer_dir, output, max_length=100)
    assert prepare(mixed_corpus, tokenizer_dir, output, max_length=100, overwrite=True).counts["rows_written"] == 6


def test_corrupted_shard_is_detected_and_rebuilt(tmp_path, tokenizer_dir, mixed_corpus):
    output = tmp_path / "out"
    prepare(mixed_corpus, tokenizer_dir, output)
    shard = output / "part-00000.parquet"
    good = shard.read_bytes()
    shard.write_bytes(good[:-100])
    assert not prepare(mixed_corpus, tokenizer_dir, output).reused  # its own shard: no --overwrite needed
    assert shard.read_bytes() == good


def test_second_writer_is_refused(tmp_path, tokenizer_dir, mixed_corpus):
    output = tmp_path / "out"
    with exclusive_output(output):
        with pytest.raises(ArtifactError, match="is being written by pid"):
            prepare(mixed_corpus, tokenizer_dir, output)


def test_no_valid_row_is_an_error_naming_the_input(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x"}, b"{nope\n"])
    with pytest.raises(UserError, match=r"no valid row in .*bad.jsonl \(2 read"):
        prepare(corpus, tokenizer_dir, tmp_path / "out")
    assert pl.read_parquet(tmp_path / "out" / "rejected.parquet").height == 2


def test_cli_exit_codes_and_messages(tmp_path, tokenizer_dir, mixed_corpus, capsys):
    base = ["prepare", "--tokenizer", str(tokenizer_dir)]
    assert main([*base, "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "a")]) == 2
    assert "missing.jsonl does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main([*base, "--input", str(empty), "--output", str(tmp_path / "b")]) == 2
    assert "no valid row in" in capsys.readouterr().err
    # Written, but an input gave nothing: status 3 and the input named.
    assert main([*base, "--input", str(mixed_corpus), "--output", str(tmp_path / "c"), "--rows-per-shard", "3"]) == 3
    printed = capsys.readouterr()
    assert "empty.jsonl (empty)" in printed.err and "rows rejected" in printed.out
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q", "response": "A"}])
    assert main([*base, "--input", str(ok), "--output", str(tmp_path / "d")]) == 0
    with pytest.raises(SystemExit) as exited:
        main([*base, "--input", str(ok), "--output", str(tmp_path / "e"), "--on-overflow", "drop"])
    assert exited.value.code == 2 and "invalid choice: 'drop'" in capsys.readouterr().err


def test_yaml_config_and_flags_fill_the_same_config(tmp_path, tokenizer_dir):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q", "response": "A"}])
    config = tmp_path / "prepare.yaml"
    config.write_text(f"input: [{ok}]\ntokenizer: {tokenizer_dir}\noutput: {tmp_path / 'out'}\nmax-length: 99\n")
    assert main(["prepare", "--config", str(config), "--rows-per-shard", "7"]) == 0
    saved = read_manifest(tmp_path / "out")["config"]
    assert saved["max_length"] == 99 and saved["rows_per_shard"] == 7


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path, capsys):
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q", "response": "A"}])
    missing = tmp_path / "no-such-model"
    assert main(["prepare", "--input", str(ok), "--tokenizer", str(missing), "--output", str(tmp_path / "out")]) == 2
    assert f"tokenizer folder {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_files_the_stage_did_not_write_are_refused_and_never_deleted(tmp_path, tokenizer_dir, mixed_corpus):
    output = tmp_path / "out"
    output.mkdir()
    theirs = output / "part-00007-3f1c.parquet"
    pq.write_table(pa.table({"x": [1]}), theirs)
    before = theirs.read_bytes()
    with pytest.raises(ArtifactError, match=r"did not write: part-00007-3f1c.parquet; .*--overwrite"):
        prepare(mixed_corpus, tokenizer_dir, output)
    assert theirs.read_bytes() == before and not (output / "part-00000.parquet").exists()
    # A run killed before its manifest leaves only files its records name: the rerun resumes.
    assert prepare(mixed_corpus, tokenizer_dir, output, overwrite=True).counts["rows_written"] == 6
    (output / "manifest.json").unlink()
    (output / "part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00007-3f1c.parquet"):
        prepare(mixed_corpus, tokenizer_dir, output)
    summary = prepare(mixed_corpus, tokenizer_dir, output, overwrite=True)
    assert summary.counts["rows_written"] == 6 and theirs.read_bytes() == before


@pytest.mark.parametrize("field", ["rejected", "absolute"])
def test_a_manifest_naming_files_outside_the_folder_never_makes_a_rerun_delete_them(tmp_path, tokenizer_dir, capsys, field):
    """Issue 20 item 1: a plain rerun used to delete what an old manifest listed outside the folder (exit 0)."""
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"prompt": "Q", "response": "A"}])
    args = ["prepare", "--tokenizer", str(tokenizer_dir), "--input", str(ok), "--output", str(tmp_path / "out")]
    assert main(args) == 0
    victim = tmp_path / "victim.txt"
    victim.write_text("not sstoken's")
    manifest_path = tmp_path / "out" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    entry = {"file": "../victim.txt" if field == "rejected" else str(victim), "rows": 0, "sha256": "0" * 64}
    manifest["rejected" if field == "rejected" else "notes"] = entry
    manifest_path.write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "which is not a file name inside its folder" in err and len(err.splitlines()) == 1
    assert victim.read_text() == "not sstoken's"
    assert main([*args, "--overwrite"]) == 0  # the edited manifest is not ours: nothing it names is removed
    assert victim.read_text() == "not sstoken's" and read_manifest(tmp_path / "out")["rejected"]["file"] == "rejected.parquet"


@pytest.mark.parametrize("inside", [False, True])
def test_an_output_in_the_input_folder_is_refused_up_front(tmp_path, tokenizer_dir, inside):
    export = tmp_path / "spark-export"  # a corpus exported by another tool, named like our shards
    export.mkdir()
    pq.write_table(pa.table({"prompt": ["Q"], "response": ["A"]}), export / "part-00000.parquet")
    pq.write_table(pa.table({"prompt": ["Q2"], "response": ["A2"]}), export / "part-00001.parquet")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    output = export / "tokenized" if inside else export
    with pytest.raises(ArtifactError, match="input folder .*choose an output folder outside the inputs"):
        prepare(export, tokenizer_dir, output, overwrite=True)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before


def test_bad_inputs_never_stop_the_run_and_each_rejection_names_its_place(tmp_path, tokenizer_dir, caplog):
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = write_jsonl(folder / "good.jsonl", [{"prompt": "Q0", "response": "A"}])
    write_jsonl(folder / "deep.jsonl", [b"[" * 100_000 + b"\n", {"prompt": "Q1", "response": "A"}])
    write_jsonl(folder / "surrogate.jsonl", [b'{"prompt": "Q\\ud800", "response": "A"}\n', {"prompt": "Q2", "response": "A"}])
    (folder / "array.json").write_text('[{"prompt": "Q3", "response": "A"}, {oops}, {"prompt": "Q4", "response": "A"}]')
    (folder / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "Q5", "response": "A"}).encode())
    pq.write_table(pa.Table.from_pylist([{"prompt": "Q6", "response": "A"}]), folder / "renamed.jsonl")
    damaged = folder / "damaged.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"Q{i} " + "x" * 300, "response": "A"} for i in range(7, 13)]),
                   damaged, row_group_size=2)
    column = pq.ParquetFile(damaged).metadata.row_group(1).column(0)
    data = bytearray(damaged.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 100] = b"A" * 100
    damaged.write_bytes(bytes(data))

    # good.jsonl is given twice (in the folder and by name): it is read once.
    summary = run_prepare(PrepareConfig(input=[folder, good], tokenizer=str(tokenizer_dir), output=tmp_path / "out"))
    counts = summary.counts
    assert counts["rows_read"] == counts["rows_written"] + counts["rows_rejected"] == 16
    assert counts["rows_written"] == 10  # Q0 to Q5, and the Parquet rows outside the damaged row group
    places = rejections_by_place(tmp_path / "out")
    assert places == {
        ("deep.jsonl", "line 1"): "too_deeply_nested",
        ("surrogate.jsonl", "line 1"): "invalid_unicode",
        ("array.json", "row 1"): "invalid_json",
        ("renamed.jsonl", "file"): "unreadable_file",
        ("damaged.parquet", "row 2"): "unreadable_file",
        ("damaged.parquet", "row 3"): "unreadable_file",
    }
    assert "same file" in caplog.text
    assert [entry["path"] for entry in read_manifest(tmp_path / "out")["inputs"]].count(str(good)) == 1


def test_rows_over_max_row_bytes_are_rejected_before_tokenizing(tmp_path, tokenizer_dir):
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "response": "A" * 2000}, {"prompt": "Q", "response": "A"}])
    summary = prepare(corpus, tokenizer_dir, tmp_path / "out", max_row_bytes=1000)
    assert (summary.counts["rows_written"], summary.counts["rows_rejected"]) == (1, 1)
    rejected = pl.read_parquet(tmp_path / "out" / "rejected.parquet").row(0, named=True)
    assert (rejected["locator"], rejected["reason"]) == ("line 1", "row_too_large")
    assert "over the limit of 1000 bytes" in rejected["detail"]
    assert read_manifest(tmp_path / "out")["config"]["max_row_bytes"] == 1000
    assert PrepareConfig.model_fields["max_row_bytes"].default == 4 * 1024 * 1024


def test_add_bos_is_recorded_and_changes_the_run_identity(tmp_path):
    tokenizer = tiny.build_tokenizer()
    tokenizer.bos_token = "<|endoftext|>"  # a BOS that the ChatML template leaves out
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "response": "A"}])
    output = tmp_path / "out"
    prepare(corpus, tokenizer_dir, output)
    assert read_manifest(output)["config"]["add_bos"] is False
    without = read_corpus(output).row(0, named=True)
    assert not prepare(corpus, tokenizer_dir, output, add_bos=True, overwrite=True).reused
    assert read_manifest(output)["config"]["add_bos"] is True
    with_bos = read_corpus(output).row(0, named=True)
    assert with_bos["input_ids"] == [tokenizer.bos_token_id, *without["input_ids"]]
    assert with_bos["trainable"] == [False, *without["trainable"]]


def test_add_bos_with_a_tokenizer_without_bos_fails_before_any_output(tmp_path):
    tokenizer = tiny.build_tokenizer()
    tokenizer.bos_token = None
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"prompt": "Q", "response": "A"}])
    with pytest.raises(TemplateError, match="has no BOS token; turn add_bos off"):
        prepare(corpus, tmp_path / "tokenizer", tmp_path / "out", add_bos=True)
    assert not (tmp_path / "out").exists()
