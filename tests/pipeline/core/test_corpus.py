from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.core.corpus import InputError, iter_records, resolve_inputs

ROW = {"prompt": "Q", "response": "A"}


def records(path):
    return [r for source in resolve_inputs([path]) for r in iter_records(source)]


def test_jsonl_rows_and_bad_lines_keep_their_line_numbers(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"prompt": "Q", "response": "A"}\n\n{oops\n"just a string"\n\xff\xfe{"a": 1}\n')
    got = records(path)
    assert [(r.locator, r.reason) for r in got] == [
        ("line 1", None), ("line 3", "invalid_json"), ("line 4", "invalid_json"), ("line 5", "undecodable_bytes")
    ]
    assert got[0].row == ROW


def test_json_array_object_and_jsonl_named_json(tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([ROW, 3]))
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": [ROW]}))
    (tmp_path / "lines.json").write_text(json.dumps(ROW) + "\n" + json.dumps(ROW) + "\n")
    assert [(r.locator, r.reason) for r in records(tmp_path / "array.json")] == [("row 0", None), ("row 1", "invalid_json")]
    assert [r.row for r in records(tmp_path / "wrapped.json")] == [ROW]
    assert [r.locator for r in records(tmp_path / "lines.json")] == ["line 1", "line 2"]


def test_broken_json_file_is_one_rejected_record(tmp_path):
    (tmp_path / "broken.json").write_text('[{"prompt": ')
    (got,) = records(tmp_path / "broken.json")
    assert (got.locator, got.reason) == ("file", "invalid_json")


def test_parquet_and_datasets_folder(tmp_path):
    pq.write_table(pa.Table.from_pylist([ROW, ROW]), tmp_path / "a.parquet")
    import datasets

    datasets.Dataset.from_list([ROW]).save_to_disk(str(tmp_path / "hf"))
    assert [r.locator for r in records(tmp_path / "a.parquet")] == ["row 0", "row 1"]
    hf = records(tmp_path / "hf")
    assert [r.row for r in hf] == [ROW]


def test_corrupt_parquet_is_rejected_not_fatal(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    (got,) = records(tmp_path / "bad.parquet")
    assert got.reason == "unreadable_file"


def test_folder_is_searched_in_sorted_order(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "a.json").write_text("[]")
    names = [s.path.name for s in resolve_inputs([tmp_path])]
    assert names == ["a.json", "b.jsonl", "a.jsonl"]


def test_missing_and_unsupported_paths_are_errors(tmp_path):
    with pytest.raises(InputError, match="does-not-exist.jsonl does not exist"):
        resolve_inputs([tmp_path / "does-not-exist.jsonl"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(InputError, match="unsupported extension"):
        resolve_inputs([tmp_path / "notes.txt"])


def test_empty_files_yield_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("  \n")
    assert records(tmp_path / "empty.jsonl") == []
    assert records(tmp_path / "empty.json") == []
