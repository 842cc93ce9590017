from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.runtime.files import base_manifest, read_manifest, read_shard, write_manifest, write_parquet_atomic
from pipeline.runtime.schemas import SCHEMA_DIR, SchemaError, arrow_schema, table_from_rows, validate_manifest, validate_table

TOKENIZED_ROW = dict(sample_id="s1", source="a.jsonl", input_ids=[1, 2, 3], trainable=[False, True, True],
                     n_tokens=3, n_trainable=2, n_turns=1, truncated=False)


@pytest.mark.parametrize("name", ["tokenized", "rejected", "scores", "history_nll", "masks"])
def test_every_schema_file_loads(name):
    schema = arrow_schema(name)
    definition = json.loads((SCHEMA_DIR / f"{name}.v1.json").read_text())
    assert schema.names == [f["name"] for f in definition["fields"]]


def test_parquet_round_trip_matches_the_schema_file(tmp_path):
    write_parquet_atomic(table_from_rows([TOKENIZED_ROW], "tokenized"), tmp_path / "part-00000.parquet")
    table = read_shard(tmp_path / "part-00000.parquet", "tokenized")
    assert table.schema.field("input_ids").type == pa.list_(pa.int32())
    assert table.to_pylist() == [TOKENIZED_ROW]


def test_wrong_types_and_missing_columns_are_refused(tmp_path):
    wrong = pa.table({"sample_id": ["s"], "input_ids": [[1]]})
    with pytest.raises(SchemaError, match="column 'source' required by tokenized.v1 is missing"):
        validate_table(wrong, "tokenized")
    int64_ids = table_from_rows([TOKENIZED_ROW], "tokenized").set_column(
        2, "input_ids", pa.array([[1, 2, 3]], pa.list_(pa.int64()))
    )
    pq.write_table(int64_ids, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match=r"'input_ids' is list<\w+: int64>"):
        read_shard(tmp_path / "bad.parquet", "tokenized")


def test_manifest_is_validated_on_write_and_read(tmp_path):
    manifest = base_manifest("tokenized", {"a": 1}) | {"shards": [], "counts": {"rows_read": 0}}
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path, kind="tokenized")["config"] == {"a": 1}
    with pytest.raises(SchemaError, match="at shards/0"):
        validate_manifest(manifest | {"shards": [{"file": "x.parquet", "rows": -1, "sha256": "0" * 64}]})
    (tmp_path / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 2}))
    with pytest.raises(SchemaError, match="schema_version"):
        read_manifest(tmp_path)


def test_an_optional_column_may_be_absent_but_not_of_another_type():
    from pipeline.runtime.schemas import optional_columns

    assert optional_columns("masks") == {"weight", "step"} and optional_columns("export") == {"weights"}
    assert optional_columns("scores") == {"entropy_cur", "weight"}
    row = {"sample_id": "a", "score": [float("nan"), 0.5], "keep": [False, True], "n_tokens": 2, "n_trainable": 1,
           "n_kept": 1}
    validate_table(table_from_rows([row], "masks"), "masks")  # masks written before weights existed
    validate_table(table_from_rows([row | {"weight": [0.0, 1.0]}], "masks"), "masks")
    wrong = table_from_rows([row], "masks").append_column("weight", pa.array([[0, 1]], pa.list_(pa.int32())))
    with pytest.raises(SchemaError, match=r"column 'weight' is list<item: int32>, masks.v1 requires list<item: float>"):
        validate_table(wrong, "masks")
