"""The per-token loss weight of keep masks, read alike from every folder that holds keep masks.

A masks shard (masks.v1) stores `weight` beside `keep` (optional in the schema); a scores shard, and a
masks shard written before the column existed, stores none and reads as keep as float32: 1 on every
kept token, 0 elsewhere, the weight of every binary selection. No folder is rewritten for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.alignment import WEIGHT

MASK_COLUMNS = ["sample_id", "keep"]
WEIGHT_TYPE = pa.list_(pa.float32())


def weight_column(table: pa.Table) -> pa.ChunkedArray:
    """The per-token loss weight of a table with a keep column: its own `weight`, or keep as float32 (1 where kept,
    0 elsewhere) when it has none (a binary selection, or masks written before the column existed)."""
    if WEIGHT in table.column_names:
        return table.column(WEIGHT)
    return table.column("keep").cast(WEIGHT_TYPE)


def with_weight(table: pa.Table) -> pa.Table:
    """`table` with its `weight` column, filled from keep when it has none (appended last)."""
    return table if WEIGHT in table.column_names else table.append_column(pa.field(WEIGHT, WEIGHT_TYPE, False),
                                                                           weight_column(table))


def flat_weights(keep: np.ndarray, weight: np.ndarray | None) -> np.ndarray:
    """The float32 weights a selection stores: `weight` (a weighted method's, one per token) or keep as 0/1."""
    return keep.astype(np.float32) if weight is None else np.asarray(weight, dtype=np.float32)


def stored_mask_columns(path: Path) -> list[str]:
    """sample_id, keep, and weight where the shard stores one."""
    return MASK_COLUMNS + ([WEIGHT] if WEIGHT in pq.read_schema(path).names else [])


def read_mask_columns(path: Path) -> pa.Table:
    """sample_id, keep and weight (filled from keep when the shard has none) of one scores or masks shard."""
    return with_weight(pq.read_table(path, columns=stored_mask_columns(path)))
