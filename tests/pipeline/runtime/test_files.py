from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pyarrow as pa
import pytest

from pipeline.runtime.files import (
    ArtifactError,
    base_manifest,
    exclusive_output,
    read_manifest,
    refuse_repeated_sample_ids,
    remove_stale_temporaries,
    shard_is_valid,
    shard_name,
    verify_shards,
    write_manifest,
    write_parquet_atomic,
)
from pipeline.runtime.fingerprint import sha256_file


def test_shard_names_are_deterministic():
    assert [shard_name(i) for i in (0, 7, 12345)] == ["part-00000.parquet", "part-00007.parquet", "part-12345.parquet"]


def test_atomic_write_leaves_no_temporary_and_reports_checksum(tmp_path):
    path = tmp_path / "part-00000.parquet"
    digest = write_parquet_atomic(pa.table({"x": [1, 2]}), path)
    assert digest == sha256_file(path)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00000.parquet"]
    assert shard_is_valid(path, digest, 2)
    assert not shard_is_valid(path, digest, 3)
    path.write_bytes(path.read_bytes()[:20])
    assert not shard_is_valid(path)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "part-00000.parquet"
    write_parquet_atomic(pa.table({"x": [1]}), path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        write_parquet_atomic("not a table", path)  # type: ignore[arg-type]
    assert path.read_bytes() == before and len(list(tmp_path.iterdir())) == 1


def test_stale_temporaries_are_removed(tmp_path):
    (tmp_path / ".part-00000.parquet.tmp-9-abc").write_bytes(b"x")
    (tmp_path / "part-00001.parquet").write_bytes(b"x")
    (tmp_path / ".notes.tmp-draft").write_bytes(b"a user's file, not one of our temporaries")
    remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp-draft", "part-00001.parquet"]


def test_verify_shards_names_the_broken_file(tmp_path):
    digest = write_parquet_atomic(pa.table({"x": [1]}), tmp_path / "part-00000.parquet")
    manifest = {"shards": [{"file": "part-00000.parquet", "rows": 1, "sha256": digest}]}
    verify_shards(tmp_path, manifest)
    (tmp_path / "part-00000.parquet").unlink()
    with pytest.raises(ArtifactError, match="part-00000.parquet is missing"):
        verify_shards(tmp_path, manifest)


def test_manifest_errors(tmp_path):
    with pytest.raises(ArtifactError, match="has no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        read_manifest(tmp_path)


def _hold_lock(folder, ready):
    with exclusive_output(folder):
        ready.set()
        time.sleep(60)


def test_lock_is_released_when_its_holder_is_killed(tmp_path):
    ready = multiprocessing.Event()
    holder = multiprocessing.Process(target=_hold_lock, args=(tmp_path, ready))
    holder.start()
    assert ready.wait(10)
    with pytest.raises(ArtifactError, match=f"is being written by pid {holder.pid}"):
        with exclusive_output(tmp_path):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    with exclusive_output(tmp_path):
        pass


def _listed(folder, rows):
    digest = write_parquet_atomic(pa.table({"sample_id": [f"s{i}" for i in range(rows)]}), folder / "part-00000.parquet")
    return {"file": "part-00000.parquet", "rows": rows, "sha256": digest}


def test_manifest_that_is_not_an_object_names_the_file(tmp_path):
    (tmp_path / "manifest.json").write_text('["part-00000.parquet"]')
    with pytest.raises(ArtifactError, match=r"manifest.json is not a manifest: it holds a JSON list, not an object"):
        read_manifest(tmp_path)


def test_manifest_listing_a_shard_twice_is_refused(tmp_path):
    entry = _listed(tmp_path, 2)
    write_manifest(tmp_path, base_manifest("tokenized", {}) | {"shards": [entry, entry], "counts": {}})
    with pytest.raises(ArtifactError, match="lists part-00000.parquet more than once"):
        read_manifest(tmp_path)


def test_an_edited_row_count_is_a_manifest_problem(tmp_path):
    entry = _listed(tmp_path, 2)
    with pytest.raises(ArtifactError, match=r"manifest.json says part-00000.parquet has 5 rows, the file has 2; the manifest"):
        verify_shards(tmp_path, {"shards": [entry | {"rows": 5}]})


def test_a_sample_id_twice_across_shards_is_refused(tmp_path):
    first = _listed(tmp_path, 2)
    (tmp_path / "part-00000.parquet").rename(tmp_path / "part-00001.parquet")
    second = _listed(tmp_path, 3)
    manifest = {"shards": [second, first | {"file": "part-00001.parquet"}]}
    with pytest.raises(ArtifactError, match=r"holds sample id 's0' twice \(part-00000.parquet and part-00001.parquet\)"):
        refuse_repeated_sample_ids(tmp_path, manifest)
    refuse_repeated_sample_ids(tmp_path, {"shards": [second]})
