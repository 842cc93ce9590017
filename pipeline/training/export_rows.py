"""The rows of an export: one tokenized shard's samples with the labels and weights their keep masks give.

The join (which mask row belongs to which token row) is the trainer's (`training_data.join_samples`),
and the labels are the trainer's (`masked_labels`): an exported row trains on exactly the tokens
`sstoken train` would train on. `weights` are the masks' weights at the labels (keep as 0/1 for masks
without weights), 0 elsewhere: what the trainer's loss sum(w_i * nll_i) / sum(w_i) weighs each label by.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.runtime.schemas import arrow_schema
from pipeline.runtime.mask_weights import WEIGHT_TYPE, read_mask_columns
from pipeline.training.masked_loss import IGNORE_INDEX, masked_labels
from pipeline.training.training_data import TrainingSource
from pipeline.runtime.files import ArtifactError


@dataclass(frozen=True)
class ShardRows:
    """One tokenized shard's export: the rows written and the samples left out (no kept token)."""

    table: pa.Table
    without_kept: int


def _flat(column: pa.ChunkedArray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a list column: row r is values[offsets[r]:offsets[r + 1]]."""
    array = column.combine_chunks()
    offsets = array.offsets.to_numpy()
    values = np.array(array.values.to_numpy(zero_copy_only=False), dtype=dtype)  # a writable copy, for torch
    return values[offsets[0]:], offsets - offsets[0]


def _mask_columns(source: TrainingSource, rows: pl.DataFrame) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """The keep masks and weights of `rows` (their mask file and row), in the order of `rows`."""
    parts, order = [], []
    for (mask_file,), group in rows.with_row_index("position").group_by("file_mask", maintain_order=True):
        masks = read_mask_columns(Path(source.masks) / mask_file).take(group["row_mask"].to_list())
        if masks.column("sample_id").to_pylist() != group["sample_id"].to_list():
            raise ArtifactError(f"{source.masks / mask_file} changed while it was exported; run sstoken export again")
        parts.append(masks)
        order.extend(group["position"].to_list())
    inverse = pa.array(np.argsort(np.asarray(order, dtype=np.int64), kind="stable"))
    keep, weight = (pa.chunked_array([chunk for part in parts for chunk in part.column(name).chunks], type=kind)
                    for name, kind in (("keep", pa.list_(pa.bool_())), ("weight", WEIGHT_TYPE)))
    return keep.take(inverse), weight.take(inverse)


def shard_rows(source: TrainingSource, joined: pl.DataFrame, file: str, keep_without_kept: bool) -> ShardRows:
    """The export rows of tokenized shard `file`, in its row order; `joined` is `join_samples(source)`."""
    rows = joined.filter(pl.col("file") == file).sort("row")
    without_kept = int((rows["kept"] == 0).sum())
    if not keep_without_kept:
        rows = rows.filter(pl.col("kept") > 0)
    tokens = pq.read_table(Path(source.tokenized) / file, columns=["sample_id", "source", "input_ids"])
    tokens = tokens.take(rows["row"].to_list())
    if tokens.column("sample_id").to_pylist() != rows["sample_id"].to_list():
        raise ArtifactError(f"{source.tokenized / file} changed while it was exported; run sstoken export again")
    ids, offsets = _flat(tokens.column("input_ids"), np.int32)
    keep_column, weight_column = _mask_columns(source, rows)
    keep, keep_offsets = _flat(keep_column, np.bool_)
    weight, weight_offsets = _flat(weight_column, np.float32)
    if not np.array_equal(offsets, keep_offsets) or not np.array_equal(offsets, weight_offsets):
        # join_samples compared the lengths; the files changed since
        raise ArtifactError(f"{source.masks} changed while it was exported; run sstoken export again")
    labels = np.empty_like(ids)
    for start, end in zip(offsets[:-1], offsets[1:]):
        labels[start:end] = masked_labels(torch.from_numpy(ids[start:end]), torch.from_numpy(keep[start:end])).numpy()
    weights = np.where(labels != IGNORE_INDEX, weight, np.float32(0)).astype(np.float32)
    lengths = np.diff(offsets).astype(np.int32)
    list_offsets = pa.array(offsets.astype(np.int32))
    schema = arrow_schema("export")
    table = pa.table(
        {
            "sample_id": tokens.column("sample_id"),
            "source": tokens.column("source"),
            "input_ids": pa.ListArray.from_arrays(list_offsets, pa.array(ids, pa.int32())),
            "attention_mask": pa.ListArray.from_arrays(list_offsets, pa.array(np.ones(len(ids), np.int8))),
            "labels": pa.ListArray.from_arrays(list_offsets, pa.array(labels, pa.int32())),
            "weights": pa.ListArray.from_arrays(list_offsets, pa.array(weights, pa.float32())),
            "n_tokens": pa.array(lengths),
            "n_kept": pa.array(rows["kept"].to_numpy().astype(np.int32)),
        }
    )
    return ShardRows(table.cast(schema), without_kept)
