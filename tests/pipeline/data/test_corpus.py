from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.corpus import iter_records, resolve_inputs
from pipeline.runtime.errors import UserError

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
    (tmp_path / "broken.json").write_text('{"data": [{"prompt": ')
    (got,) = records(tmp_path / "broken.json")
    assert (got.locator, got.reason) == ("file", "invalid_json")
    (tmp_path / "broken_array.json").write_text('[{"prompt": ')  # an array: its one (unfinished) entry
    (got,) = records(tmp_path / "broken_array.json")
    assert (got.locator, got.reason) == ("row 0", "invalid_json")


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
    with pytest.raises(UserError, match="does-not-exist.jsonl does not exist"):
        resolve_inputs([tmp_path / "does-not-exist.jsonl"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported extension"):
        resolve_inputs([tmp_path / "notes.txt"])


def test_empty_files_yield_nothing(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("  \n")
    assert records(tmp_path / "empty.jsonl") == []
    assert records(tmp_path / "empty.json") == []


def reasons(path, **options):
    return [(r.locator, r.reason) for source in resolve_inputs([path]) for r in iter_records(source, **options)]


def test_line_nested_past_the_recursion_limit_is_one_rejected_row(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text("[" * 100_000 + "\n" + '{"a": ' * 200 + "1" + "}" * 200 + "\n" + json.dumps(ROW) + "\n")
    assert reasons(path) == [("line 1", "too_deeply_nested"), ("line 2", "too_deeply_nested"), ("line 3", None)]


def test_lone_surrogate_is_rejected_with_its_place(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"prompt": "Q\\ud800", "response": "A"}\n{"\\udfff": 1}\n' + json.dumps(ROW) + "\n")
    got = records(path)
    assert [(r.locator, r.reason) for r in got] == [("line 1", "invalid_unicode"), ("line 2", "invalid_unicode"), ("line 3", None)]
    assert "lone surrogate" in got[0].detail
    got[0].detail.encode("utf-8")  # the detail itself can be written to Parquet


def test_parquet_corrupted_mid_file_keeps_the_other_row_groups(tmp_path):
    path = tmp_path / "c.parquet"
    rows = [{"prompt": f"question {i} " + "x" * 200, "response": "a" * 300} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=10)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 100] = b"A" * 100
    path.write_bytes(bytes(data))
    got = records(path)
    good = [r for r in got if r.row is not None]
    assert [r.locator for r in good] == [f"row {i}" for i in [*range(10), *range(20, 30)]]
    bad = [r for r in got if r.row is None]
    assert [(r.locator, r.reason) for r in bad] == [(f"row {i}", "unreadable_file") for i in range(10, 20)]
    assert "row group 1 is damaged, rows 10 to 19 not read" in bad[0].detail
    assert len(got) == pq.ParquetFile(path).metadata.num_rows  # every row of the file is accounted for


def test_json_array_with_bad_entries_rejects_only_those_entries(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b'[\n' + json.dumps(ROW).encode() + b',\n{oops, "x": [1, "]"]},\n"a string",\n'
                     + b'{"prompt": "caf\xe9", "response": "A"},\n' + json.dumps(ROW).encode() + b'\n]\n')
    assert reasons(path) == [("row 0", None), ("row 1", "invalid_json"), ("row 2", "invalid_json"),
                             ("row 3", "undecodable_bytes"), ("row 4", None)]


def test_unclosed_json_array_keeps_the_entries_before_the_break(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[" + json.dumps(ROW) + ', {"prompt": "unterminated')
    assert reasons(path) == [("row 0", None), ("row 1", "invalid_json")]


def test_byte_order_mark_is_not_a_lost_row(tmp_path):
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROW).encode() + b"\n" + json.dumps(ROW).encode())
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([ROW]).encode())
    assert [r.row for r in records(tmp_path / "bom.jsonl")] == [ROW, ROW]
    assert [r.row for r in records(tmp_path / "bom.json")] == [ROW]


def test_parquet_under_a_jsonl_name_says_it_looks_like_parquet(tmp_path):
    pq.write_table(pa.Table.from_pylist([ROW]), tmp_path / "data.jsonl")
    (got,) = records(tmp_path / "data.jsonl")
    assert (got.locator, got.reason) == ("file", "unreadable_file")
    assert "looks like a Parquet file" in got.detail and ".parquet" in got.detail


def test_row_size_limit_is_checked_before_parsing(tmp_path):
    big = {"prompt": "Q", "response": "A" * 5000}
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_bytes(json.dumps(big).encode() + b"\n" + b"{" * 20_000 + b"\n" + json.dumps(ROW).encode() + b"\n")
    assert reasons(jsonl, max_row_bytes=1000) == [("line 1", "row_too_large"), ("line 2", "row_too_large"), ("line 3", None)]
    (tmp_path / "big.json").write_text(json.dumps([big, ROW]))
    assert reasons(tmp_path / "big.json", max_row_bytes=1000) == [("row 0", "row_too_large"), ("row 1", None)]
    pq.write_table(pa.Table.from_pylist([big, ROW]), tmp_path / "big.parquet")
    got = records_with(tmp_path / "big.parquet", max_row_bytes=1000)
    assert [(r.locator, r.reason) for r in got] == [("row 0", "row_too_large"), ("row 1", None)]
    assert "over the limit of 1000 bytes" in got[0].detail


def records_with(path, **options):
    return [r for source in resolve_inputs([path]) for r in iter_records(source, **options)]


def test_a_file_given_twice_or_through_its_folder_is_read_once(tmp_path, caplog):
    (tmp_path / "a.jsonl").write_text(json.dumps(ROW) + "\n")
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "a.jsonl")
    sources = resolve_inputs([tmp_path / "a.jsonl", tmp_path, tmp_path / "a.jsonl"])
    assert [s.path for s in sources] == [tmp_path / "a.jsonl"]
    assert "given more than once" in caplog.text


def test_symlink_loops_walk_each_real_folder_once(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.jsonl").write_text(json.dumps(ROW) + "\n")
    (root / "a" / "loop").symlink_to(root)  # a link back to an ancestor
    (root / "a" / "to_b").symlink_to(root / "b")  # two links that point at each other's folders
    (root / "b" / "to_a").symlink_to(root / "a")
    sources = resolve_inputs([root])
    assert [s.path for s in sources] == [root / "a" / "x.jsonl"]


def test_json_array_edges(tmp_path):
    cases = {
        "[]": [],
        "[" + json.dumps(ROW) + ",]": [("row 0", None)],  # a trailing comma loses nothing
        "[" + json.dumps(ROW) + ",,3]": [("row 0", None), ("row 1", "invalid_json"), ("row 2", "invalid_json")],
        "[" + json.dumps(ROW) + ",": [("row 0", None), ("row 1", "invalid_json")],  # cut short
        "[" + json.dumps(ROW) + "] 7": [("row 0", None), ("after the array", "invalid_json")],
    }
    for index, (text, expected) in enumerate(cases.items()):
        (tmp_path / f"{index}.json").write_text(text)
        assert reasons(tmp_path / f"{index}.json") == expected, text


def test_an_over_long_line_is_skipped_in_bounded_memory(tmp_path):
    import tracemalloc

    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as handle:
        handle.write(b'{"prompt": "Q", "response": "' + b"A" * (50 << 20) + b'"}\n' + json.dumps(ROW).encode() + b"\n")
    tracemalloc.start()
    got = reasons(path, max_row_bytes=1 << 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert got == [("line 1", "row_too_large"), ("line 2", None)]
    assert peak < 8 << 20  # a few pieces of the line at a time, never the 50 MB line


def test_crlf_lines_at_the_limit_keep_their_line_numbers(tmp_path):
    line = json.dumps(ROW).encode()
    (tmp_path / "crlf.jsonl").write_bytes(line + b"\r\n" + line + b"x\r\n" + line + b"\r\n")
    assert reasons(tmp_path / "crlf.jsonl", max_row_bytes=len(line)) == [
        ("line 1", None), ("line 2", "row_too_large"), ("line 3", None)
    ]


def test_a_file_name_that_is_not_utf8_is_refused_by_name(tmp_path):
    import os

    with open(os.path.join(os.fsencode(tmp_path), b"caf\xe9.jsonl"), "w") as handle:
        handle.write(json.dumps(ROW) + "\n")
    with pytest.raises(UserError, match=r"caf\\xe9.jsonl has a name that is not valid UTF-8; rename it"):
        resolve_inputs([tmp_path])
