import pyarrow as pa
import pytest

from pipeline.runtime.schemas import SchemaError, arrow_schema
from pipeline.scoring.history_cache import history_cache_dir, load_cached_history, store_history


def _table():
    return pa.Table.from_pylist(
        [{"sample_id": "a", "nll": [float("nan"), 1.5, 2.0]}, {"sample_id": "b", "nll": [float("nan"), 0.25]}],
        schema=arrow_schema("history_nll"),
    )


def test_cache_dir_is_keyed_by_checkpoint_data_and_dtype(tmp_path):
    base = history_cache_dir(tmp_path, "ckpt", "data", "float32")
    assert base == tmp_path / "history_nll" / "ckpt" / "data" / "float32"
    assert history_cache_dir(tmp_path, "ckpt", "data", "bfloat16") != base
    assert history_cache_dir(tmp_path, "ckpt2", "data", "float32") != base
    assert history_cache_dir(tmp_path, "ckpt", "data2", "float32") != base
    assert history_cache_dir(tmp_path, "a/../b", "d", "x").parent.parent.name == "a_.._b"


def test_store_then_load_roundtrip_without_leftovers(tmp_path):
    folder = history_cache_dir(tmp_path, "c", "d", "float32")
    assert load_cached_history(folder, "part-00000.parquet") is None
    store_history(folder, "part-00000.parquet", _table())
    loaded = load_cached_history(folder, "part-00000.parquet")
    assert loaded.column("sample_id").to_pylist() == ["a", "b"]
    assert loaded.column("nll").to_pylist()[0][1:] == [1.5, 2.0]
    assert [p.name for p in folder.iterdir()] == ["part-00000.parquet"]


def test_corrupt_or_foreign_file_counts_as_absent(tmp_path):
    (tmp_path / "part-00000.parquet").write_bytes(b"not parquet at all")
    assert load_cached_history(tmp_path, "part-00000.parquet") is None
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sample_id": ["a"], "other": [1]}), tmp_path / "part-00001.parquet")
    assert load_cached_history(tmp_path, "part-00001.parquet") is None


def test_store_refuses_a_table_of_the_wrong_schema(tmp_path):
    with pytest.raises(SchemaError, match="nll"):
        store_history(tmp_path, "part-00000.parquet", pa.table({"sample_id": ["a"]}))
