"""Tokens joined with keep masks by sample_id, the refusals, and the deterministic data plan."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.runtime.files import ArtifactError
from pipeline.training.training_data import DataPlan, build_index, load_samples, open_training_data
from tests.factories import write_keep_masks, write_tokenized

SHARDS = [6, 5]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory, tokenizer) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, SHARDS, seed=4)


@pytest.fixture(scope="module")
def masks(tmp_path_factory, tokenized) -> Path:
    return write_keep_masks(tmp_path_factory.mktemp("masks"), tokenized, ratio=0.5, seed=1)


def test_index_joins_by_sample_id_with_lengths_and_kept_counts(tokenized, masks):
    source = open_training_data(tokenized, masks)
    index = build_index(source)
    assert index.samples + index.without_kept == sum(SHARDS)
    rows = load_samples(source, index, np.arange(index.samples))
    for position, (ids, keep, weight) in rows.items():
        np.testing.assert_array_equal(weight, keep.astype(np.float32))  # masks without weights: weight = keep
        assert len(ids) == len(keep) == index.lengths[position]
        assert keep[1:].sum() == index.kept[position] > 0


def test_a_masks_folder_of_kind_masks_is_read_the_same(tokenized, masks, tmp_path):
    other = write_keep_masks(tmp_path / "masks", tokenized, ratio=0.5, seed=1, kind="masks")
    assert build_index(open_training_data(tokenized, other)).sample_ids == build_index(
        open_training_data(tokenized, masks)).sample_ids


def test_missing_folders_are_refused_by_name(tokenized, masks, tmp_path):
    with pytest.raises(ArtifactError, match=f"tokenized data folder {tmp_path / 'nope'} does not exist; run `sstoken prepare`"):
        open_training_data(tmp_path / "nope", masks)
    with pytest.raises(ArtifactError, match=f"masks folder {tmp_path / 'gone'} does not exist"):
        open_training_data(tokenized, tmp_path / "gone")
    with pytest.raises(ArtifactError, match="holds a 'tokenized' artifact, not keep masks"):
        open_training_data(tokenized, tokenized)


def test_masks_of_other_tokenized_data_are_refused(tokenizer, masks, tmp_path):
    other = write_tokenized(tmp_path / "other", tokenizer, SHARDS, seed=5)
    with pytest.raises(ArtifactError, match="was made from other tokenized data than"):
        open_training_data(other, masks)


def test_masks_made_with_another_tokenizer_are_refused(tokenized, masks, tmp_path):
    copy = Path(shutil.copytree(masks, tmp_path / "masks"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0" * 64
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="was made with another tokenizer"):
        open_training_data(tokenized, copy)


def test_masks_whose_lengths_disagree_are_refused(tokenized, tmp_path):
    longer = write_keep_masks(tmp_path / "masks", tokenized, shift_length=1)
    with pytest.raises(ArtifactError, match=r"masks of another length than their tokens, e\.g\. 's00-0000'"):
        build_index(open_training_data(tokenized, longer))


def test_sample_ids_without_masks_are_refused(tokenized, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.runtime.files import read_manifest, write_manifest, write_parquet_atomic

    folder = write_keep_masks(tmp_path / "masks", tokenized)
    manifest = read_manifest(folder)
    entry = manifest["shards"][1]
    table = pq.read_table(folder / entry["file"]).slice(1)  # the first sample of shard 1 loses its mask
    entry["sha256"], entry["rows"] = write_parquet_atomic(table, folder / entry["file"]), table.num_rows
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match="1 sample ids of .* have no mask in .* 's01-0000'"):
        build_index(open_training_data(tokenized, folder))


@pytest.mark.parametrize("where, message", [
    ("position 0", r"position 0: 'keep' is true at position 0 \(never a target\) in 1 sample of part-00000.parquet \(e\.g\. 's00-0000'\)"),
    ("prompt", r"keep off the targets: keep is true where trainable is false in 1 sample of part-00000.parquet \(e\.g\. 's00-0000'\)"),
])
def test_masks_keeping_a_token_that_is_no_target_are_refused(tokenized, tmp_path, where, message):
    """The manifest is sealed over the edited masks (checksums match): the join checks keep against trainable."""
    edited = write_keep_masks(tmp_path / "masks", tokenized, keep_off_targets=where)
    with pytest.raises(ArtifactError, match=f"keeps or weighs tokens against the alignment contract of .*: {message}"):
        build_index(open_training_data(tokenized, edited))


def test_masks_keeping_no_token_are_refused(tokenized, tmp_path):
    empty = write_keep_masks(tmp_path / "masks", tokenized, ratio=0.0)
    with pytest.raises(ArtifactError, match="no sample of .* keeps any token"):
        build_index(open_training_data(tokenized, empty))


def test_a_changed_shard_is_refused(tokenized, masks, tmp_path):
    copy = Path(shutil.copytree(masks, tmp_path / "masks"))
    (copy / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(ArtifactError, match="does not match the checksum"):
        build_index(open_training_data(tokenized, copy))


def test_the_plan_is_a_pure_function_of_seed_and_epoch():
    plan = DataPlan(samples=10, batch_size=4, micro_batch_size=2, workers=1, seed=3, epochs=2.0)
    assert plan.steps == 5
    stream = np.concatenate([plan.global_batch(step) for step in range(plan.steps)])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))  # epochs end to end
    assert list(stream[:10]) != list(stream[10:])  # each epoch shuffled afresh
    again = DataPlan(samples=10, batch_size=4, micro_batch_size=2, workers=1, seed=3, epochs=2.0)
    assert np.array_equal(again.global_batch(3), plan.global_batch(3))
    other_seed = DataPlan(samples=10, batch_size=4, micro_batch_size=2, workers=1, seed=4, epochs=2.0)
    assert not all(np.array_equal(other_seed.global_batch(s), plan.global_batch(s)) for s in range(5))


def test_ranks_split_each_global_batch_by_length_whatever_the_worker_count():
    lengths = np.array([9, 3, 7, 5, 1, 8, 2, 6, 4, 10, 11, 12])
    one = DataPlan(samples=12, batch_size=8, micro_batch_size=2, workers=1, seed=0, epochs=1.0)
    two = DataPlan(samples=12, batch_size=8, micro_batch_size=2, workers=2, seed=0, epochs=1.0)
    for step in range(one.steps):
        single = one.micro_batches(step, 0, lengths)
        split = [two.micro_batches(step, rank, lengths) for rank in (0, 1)]
        assert len(single) == 4 and [len(s) for s in split] == [2, 2]
        assert sorted(np.concatenate(single)) == sorted(one.global_batch(step))
        assert sorted(np.concatenate([b for rank in split for b in rank])) == sorted(one.global_batch(step))
        flat = np.concatenate(single)
        assert list(lengths[flat]) == sorted(lengths[flat])  # micro-batches of similar lengths


def test_a_plan_with_fewer_samples_than_a_batch_has_no_step():
    assert DataPlan(samples=3, batch_size=4, micro_batch_size=2, workers=1, seed=0, epochs=1.0).steps == 0



@pytest.mark.parametrize("change, message", [
    (lambda weight, keep: -1.0 if not keep else weight, "'weight' negative: a weight is below 0"),
    (lambda weight, keep: 0.0 if keep else weight, "'weight' where kept: a weight is not > 0 where keep is true"),
    (lambda weight, keep: float("inf") if keep else weight, "'weight' not finite"),
])
def test_masks_with_bad_weights_are_refused_naming_the_problem(tokenized, tmp_path, change, message):
    """The weights are checked with the keep mask in the trainer's join (a resealed manifest passes the checksums)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.runtime.files import read_manifest, write_manifest, write_parquet_atomic

    folder = write_keep_masks(tmp_path / "masks", tokenized, weights="random")
    manifest = read_manifest(folder)
    entry = manifest["shards"][0]
    rows = pq.read_table(folder / entry["file"]).to_pylist()
    rows[0]["weight"] = [change(w, k) for w, k in zip(rows[0]["weight"], rows[0]["keep"])]
    table = pa.Table.from_pylist(rows, schema=pq.read_schema(folder / entry["file"]))
    entry["sha256"] = write_parquet_atomic(table, folder / entry["file"])
    write_manifest(folder, manifest)
    with pytest.raises(ArtifactError, match=rf"keeps or weighs tokens against the alignment contract of .*: {message}"):
        build_index(open_training_data(tokenized, folder))
