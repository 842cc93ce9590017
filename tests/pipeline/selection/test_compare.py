"""Agreement of two rounds' keep masks, on literal masks."""

from __future__ import annotations

import pyarrow as pa

from pipeline.runtime.files import base_manifest, write_manifest, write_parquet_atomic
from pipeline.selection.compare import mask_agreement


def _masks(folder, rows: dict[str, list[bool]], trainable: dict[str, int]):
    folder.mkdir()
    table = pa.table({
        "sample_id": list(rows),
        "keep": list(rows.values()),
        "n_trainable": pa.array([trainable[i] for i in rows], type=pa.int32()),
    })
    digest = write_parquet_atomic(table, folder / "part-00000.parquet")
    write_manifest(folder, base_manifest("scores", {}) | {
        "shards": [{"file": "part-00000.parquet", "rows": table.num_rows, "sha256": digest}], "counts": {},
    })
    return folder


def test_agreement_over_the_common_samples_trainable_tokens(tmp_path):
    trainable = {"a": 4, "b": 2, "c": 3}
    first = _masks(tmp_path / "r0", {"a": [False, True, True, False, False], "b": [False, True, False], "c": [True]}, trainable)
    second = _masks(tmp_path / "r1", {"b": [False, False, True], "a": [False, True, False, True, False]}, trainable)
    agreement = mask_agreement(first, second)
    # a: kept {1,2} vs {1,3}: both 1, either 3; b: {1} vs {2}: both 0, either 2; c only in the first round.
    # Flips: a drops 2 and keeps 3, b drops 1 and keeps 2.
    assert agreement == {"samples": 2, "trainable": 6, "same_decision": 1 - 4 / 6, "kept_overlap": 1 / 5,
                         "kept_to_dropped": 2, "dropped_to_kept": 2}


def test_identical_masks_agree_fully(tmp_path):
    rows = {"a": [False, True, False, True]}
    first, second = _masks(tmp_path / "r0", rows, {"a": 3}), _masks(tmp_path / "r1", rows, {"a": 3})
    assert mask_agreement(first, second) == {"samples": 1, "trainable": 3, "same_decision": 1.0, "kept_overlap": 1.0,
                                             "kept_to_dropped": 0, "dropped_to_kept": 0}
