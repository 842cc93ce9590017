"""Score tables with their keep masks rewritten from the stored scores, without any model.

The `score` column does not depend on the keep ratio or the granularity, so changing either only
re-selects: per sample here (`per_sample_keep`), corpus-wide in `pipeline.engine.global_selection`. Both
end in `with_keep`, which replaces `keep` and `n_kept` and leaves every other column untouched.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine.selection import select_sample


def flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a list column, all rows concatenated."""
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def with_keep(scores: pa.Table, keep: np.ndarray) -> pa.Table:
    """`scores` with `keep` set from a flat mask (one entry per token, rows in order) and `n_kept` recounted."""
    lengths = pc.list_value_length(scores.column("score")).to_numpy(zero_copy_only=False)
    if len(keep) != int(lengths.sum()):
        raise ValueError(f"keep mask has {len(keep)} entries for {int(lengths.sum())} tokens")
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    n_kept = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int32)
    keep_column = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(keep, pa.bool_()))
    schema = scores.schema
    table = scores.set_column(schema.get_field_index("keep"), schema.field("keep"), keep_column.cast(schema.field("keep").type))
    table = table.set_column(schema.get_field_index("n_kept"), schema.field("n_kept"), pa.array(n_kept, pa.int32()))
    return table.replace_schema_metadata(schema.metadata)


def per_sample_keep(scores: pa.Table, trainable: pa.ChunkedArray, ratio: float) -> pa.Table:
    """`scores` re-selected per sample at `ratio`: the masks the scorer itself writes at that ratio."""
    lengths = pc.list_value_length(scores.column("score")).to_numpy(zero_copy_only=False)
    if pc.list_value_length(trainable).to_numpy(zero_copy_only=False).tolist() != lengths.tolist():
        raise ValueError("score and trainable lists differ in length; they belong to different data")
    score_values = flat_values(scores.column("score")).astype(np.float32)
    mask = flat_values(trainable).astype(bool)
    keep = np.zeros(len(mask), dtype=bool)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    for start, end in zip(bounds[:-1], bounds[1:]):
        keep[start:end] = select_sample(score_values[start:end], mask[start:end], ratio)
    return with_keep(scores, keep)
