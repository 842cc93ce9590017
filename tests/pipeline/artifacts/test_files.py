from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pyarrow as pa
import pytest

from pipeline.artifacts.files import (
    ArtifactError,
    exclusive_output,
    read_manifest,
    remove_stale_temporaries,
    shard_is_valid,
    shard_name,
    verify_shards,
    write_parquet_atomic,
)
from pipeline.core.fingerprint import sha256_file


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
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["part-00001.parquet"]


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
