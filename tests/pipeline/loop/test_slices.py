"""Slicing: a seeded order cut into contiguous parts; each part written as a tokenized folder of its own."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pipeline.loop.slices import corpus_ids, materialise_slice, sample_order, slice_bounds
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_manifest, verify_shards
from pipeline.runtime.fingerprint import sha256_json
from tests.factories import write_tokenized


def test_order_depends_on_the_ids_and_seed_only():
    ids = [f"s{i}" for i in range(50)]
    assert sample_order(ids, seed=3) == sample_order(list(reversed(ids)), seed=3)
    assert sorted(sample_order(ids, seed=3)) == sorted(ids)
    assert sample_order(ids, seed=3) != sample_order(ids, seed=4)


@pytest.mark.parametrize("samples, slices", [(10, 3), (7, 7), (100, 5), (5, 1)])
def test_slices_cover_every_sample_exactly_once_in_contiguous_parts(samples, slices):
    bounds = slice_bounds(samples, slices)
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(samples))
    sizes = [stop - start for start, stop in bounds]
    assert len(bounds) == slices and max(sizes) - min(sizes) <= 1


def test_slice_bounds_are_literal():
    assert slice_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]


def test_more_slices_than_samples_is_refused_by_name():
    with pytest.raises(UserError, match="slices 6 is more than the 5 samples"):
        slice_bounds(5, 6)


def test_a_slice_is_a_tokenized_folder_with_its_own_provenance(tmp_path, tokenizer):
    corpus = write_tokenized(tmp_path / "tokenized", tokenizer, [4, 5, 3])
    order = sample_order(corpus_ids(corpus), seed=0)
    wanted = order[2:9]
    manifest = materialise_slice(corpus, wanted, tmp_path / "slice", rows_per_shard=3, description={"index": 1})
    assert read_manifest(tmp_path / "slice", kind="tokenized") == manifest
    verify_shards(tmp_path / "slice", manifest)
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    ids = [i for s in manifest["shards"] for i in pq.read_table(tmp_path / "slice" / s["file"]).column("sample_id").to_pylist()]
    assert ids == wanted
    source = read_manifest(corpus)
    assert manifest["tokenizer"] == source["tokenizer"]
    assert manifest["data_fingerprint"] == sha256_json([[s["file"], s["sha256"]] for s in manifest["shards"]])
    assert manifest["inputs"][0]["data_fingerprint"] == source["data_fingerprint"]
    assert manifest["slice"] == {"index": 1, "samples": 7}
    # Rows are copied as they are.
    source_rows = {r["sample_id"]: r for s in source["shards"] for r in pq.read_table(corpus / s["file"]).to_pylist()}
    sliced = [r for s in manifest["shards"] for r in pq.read_table(tmp_path / "slice" / s["file"]).to_pylist()]
    assert sliced == [source_rows[i] for i in wanted]


def test_a_finished_slice_is_reused_and_a_damaged_one_redone(tmp_path, tokenizer):
    corpus = write_tokenized(tmp_path / "tokenized", tokenizer, [6])
    wanted = sample_order(corpus_ids(corpus), seed=1)[:4]
    first = materialise_slice(corpus, wanted, tmp_path / "slice", rows_per_shard=2, description={})
    assert materialise_slice(corpus, wanted, tmp_path / "slice", rows_per_shard=2, description={}) == first
    (tmp_path / "slice" / "manifest.json").unlink()  # killed before the manifest
    (tmp_path / "slice" / "part-00001.parquet").write_bytes(b"half")
    again = materialise_slice(corpus, wanted, tmp_path / "slice", rows_per_shard=2, description={})
    assert again["shards"] == first["shards"]


def test_a_slice_of_ids_the_corpus_lacks_is_refused(tmp_path, tokenizer):
    corpus = write_tokenized(tmp_path / "tokenized", tokenizer, [3])
    with pytest.raises(UserError, match="lacks sample ids nope"):
        materialise_slice(corpus, ["nope"], tmp_path / "slice", rows_per_shard=2, description={})
