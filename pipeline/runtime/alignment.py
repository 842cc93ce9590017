"""The alignment contract, checked row by row on one shard's table (vectorised over its flattened lists).

    problems = alignment_problems("scores", table, "part-00000.parquet", trainable)   # [] when it holds
    problems = keep_problems(masks_table, "part-00000.parquet", trainable)           # keep alone (the trainer's join)

Every per-token list is len(input_ids) long; position 0 is never a target (trainable, keep false, a
label -100, a float NaN); keep only where trainable; floats NaN exactly off the targets (a signal not
computed is NaN at every target); the per-row counts (n_trainable, n_kept) are their lists'; weights (masks'
`weight`, exports' `weights`, when present) finite, >= 0, 0 off the targets and where not kept, > 0 where kept. Exports:
labels are -100 or their token, and only where trainable; the attention mask is 1. Each problem names
the property, how many samples and one sample id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runtime.schemas import optional_columns

IGNORE_INDEX = -100
WEIGHT = "weight"  # masks' per-token loss weight (exports call theirs `weights`); optional in both schemas
WEIGHT_COLUMNS = (WEIGHT, "weights")
# Per-token list columns of each kind (the weights only when the table has them); the float ones hold NaN off the targets.
LIST_COLUMNS = {
    "tokenized": ("input_ids", "trainable"),
    "scores": ("nll_cur", "nll_hist", "rel", "attn", "entropy_cur", "score", "keep", "weight"),
    "masks": ("score", "keep", "weight"),
    "export": ("input_ids", "attention_mask", "labels", "weights"),
    "history_nll": ("nll",),
}
FLOAT_COLUMNS = {
    "scores": ("nll_cur", "nll_hist", "rel", "attn", "entropy_cur", "score"), "masks": ("score",), "history_nll": ("nll",)
}
# manifest count -> what it counts in the shards ("rows", or the column it sums)

def _columns(kind: str, table: pa.Table, names: tuple[str, ...]) -> list[str]:
    """`names` less the optional columns a file written before they existed lacks (`schemas/README.md`) and the
    weights a table without them reads as its keep."""
    absent = (optional_columns(kind) | set(WEIGHT_COLUMNS)) - set(table.column_names)
    return [name for name in names if name not in absent]


def example(ids: list[str], count: int, where: str) -> str:
    return f"{count} sample{'s' if count != 1 else ''} of {where} (e.g. {ids[0]!r})"


def flat_lists(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, offsets) of a list column."""
    array = table.column(name).combine_chunks()
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False)
    return values[offsets[0]:offsets[-1]], offsets - offsets[0]


def rows_where(table: pa.Table, offsets: np.ndarray, flat_bad: np.ndarray) -> list[str]:
    """Sample ids of the rows holding at least one flagged element."""
    rows = np.unique(np.searchsorted(offsets, np.flatnonzero(flat_bad), side="right") - 1)
    ids = table.column("sample_id").to_pylist()
    return [ids[r] for r in rows]


def alignment_problems(kind: str, table: pa.Table, where: str, trainable: pa.ChunkedArray | None) -> list[str]:
    """Lengths, position 0, keep within the targets, NaN off the targets, per-row counts of one shard (`where`:
    its file name); `trainable`: the shard's targets in row order, when the tokenized data is at hand."""
    problems: list[str] = []
    ids = table.column("sample_id").to_pylist()
    n_tokens = table.column("n_tokens").to_numpy() if "n_tokens" in table.column_names else None
    for name in _columns(kind, table, LIST_COLUMNS[kind]):
        lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        expected = n_tokens if n_tokens is not None else lengths
        bad = np.flatnonzero(lengths != expected)
        if trainable is not None and not len(bad):
            bad = np.flatnonzero(lengths != pc.list_value_length(trainable).to_numpy(zero_copy_only=False))
        if len(bad):
            problems.append(f"length: '{name}' is not len(input_ids) long in {example([ids[i] for i in bad], len(bad), where)}")
    if problems:
        return problems  # the element checks below assume aligned lists
    starts = None
    if kind == "tokenized":
        values, offsets = flat_lists(table, "trainable")
        problems += _position_zero(table, offsets, values.astype(bool), "trainable", where)
        problems += _row_count(table, offsets, values.astype(bool), "n_trainable", "trainable", where)
        return problems
    if kind == "export":
        return problems + _export_problems(table, where, trainable)
    target = None
    if trainable is not None:
        target, starts = flat_lists(pa.table({"t": trainable}), "t")
        target = target.astype(bool)
    if "keep" in LIST_COLUMNS[kind]:
        problems += keep_problems(table, where, trainable)
        if target is not None and "n_trainable" in table.column_names:
            problems += _row_count(table, starts, target, "n_trainable", "the tokenized trainable", where)
    for name in _columns(kind, table, FLOAT_COLUMNS.get(kind, ())):
        values, offsets = flat_lists(table, name)
        nan = np.isnan(values.astype(np.float64))
        if target is None:
            problems += _position_zero_nan(table, offsets, nan, name, where)
            continue
        bad = ~nan & ~target
        if bad.any():
            rows = rows_where(table, offsets, bad)
            problems.append(f"NaN off targets: '{name}' holds a number off the targets in {example(rows, len(rows), where)}")
        at_targets = nan & target
        if at_targets.any() and not (nan | ~target).all():
            rows = rows_where(table, offsets, at_targets)
            problems.append(f"NaN at targets: '{name}' is NaN at {int(at_targets.sum())} targets (a signal is computed at "
                            f"every target or at none) in {example(rows, len(rows), where)}")
    return problems


def keep_problems(table: pa.Table, where: str, trainable: pa.ChunkedArray | None) -> list[str]:
    """The keep column of one table (lists as long as `trainable`'s): false at position 0, true only where
    trainable (when `trainable`, the rows' targets in row order, is given), counted by n_kept (when there)."""
    keep, offsets = flat_lists(table, "keep")
    keep = keep.astype(bool)
    problems = _position_zero(table, offsets, keep, "keep", where)
    problems += _row_count(table, offsets, keep, "n_kept", "keep", where)
    problems += _off_targets(table, offsets, keep, trainable, "keep off the targets: keep is true where trainable "
                             "is false", where)
    if WEIGHT in table.column_names:
        problems += weight_problems(table, WEIGHT, keep, offsets, trainable, where)
    return problems


def weight_flags(weight: np.ndarray, kept: np.ndarray, target: np.ndarray | None = None) -> list[tuple[str, np.ndarray]]:
    """(problem, flagged tokens) of flat per-token weights against the flat keep mask (and the targets, when known):
    finite, >= 0, 0 off the targets, 0 where not kept, > 0 where kept. Empty flags mean the weights hold."""
    weight = weight.astype(np.float64)
    finite = np.isfinite(weight)
    off_target = np.zeros(len(weight), bool) if target is None else ~target.astype(bool)
    return [
        ("weight not finite: a weight is NaN or infinite", ~finite),
        ("weight negative: a weight is below 0", finite & (weight < 0)),
        ("weight off the targets: a weight is not 0 where trainable is false", finite & off_target & (weight != 0)),
        ("weight where not kept: a weight is not 0 where keep is false", finite & ~off_target & ~kept & (weight != 0)),
        ("weight where kept: a weight is not > 0 where keep is true", finite & kept & (weight <= 0)),
    ]


def weight_problems(
    table: pa.Table, name: str, kept: np.ndarray, offsets: np.ndarray, trainable: pa.ChunkedArray | None, where: str
) -> list[str]:
    """`weight_flags` of the table's weight column `name` (aligned with the flat `kept`), as problems naming rows."""
    weight, _ = flat_lists(table, name)
    target = None if trainable is None else flat_lists(pa.table({"t": trainable}), "t")[0].astype(bool)
    problems = []
    for problem, flags in weight_flags(weight, kept, target):
        if flags.any():
            rows = rows_where(table, offsets, flags)
            problems.append(f"{problem.replace('weight', repr(name), 1)} in {example(rows, len(rows), where)}")
    return problems


def _off_targets(
    table: pa.Table, offsets: np.ndarray, flags: np.ndarray, trainable: pa.ChunkedArray | None, problem: str, where: str
) -> list[str]:
    """`problem`, with the rows, where `flags` is true but the token is no target (only when `trainable` is given)."""
    if trainable is None:
        return []
    target, _ = flat_lists(pa.table({"t": trainable}), "t")
    off = flags & ~target.astype(bool)
    if not off.any():
        return []
    rows = rows_where(table, offsets, off)
    return [f"{problem} in {example(rows, len(rows), where)}"]


def _position_zero(table: pa.Table, offsets: np.ndarray, flags: np.ndarray, name: str, where: str) -> list[str]:
    starts = offsets[:-1][offsets[:-1] < offsets[1:]]
    bad = np.flatnonzero(flags[starts])
    if not len(bad):
        return []
    ids = table.column("sample_id").to_pylist()
    nonempty = np.flatnonzero(offsets[:-1] < offsets[1:])
    return [f"position 0: '{name}' is true at position 0 (never a target) in "
            f"{example([ids[nonempty[i]] for i in bad], len(bad), where)}"]


def _position_zero_nan(table: pa.Table, offsets: np.ndarray, nan: np.ndarray, name: str, where: str) -> list[str]:
    starts = offsets[:-1][offsets[:-1] < offsets[1:]]
    return _position_zero(table, offsets, ~nan, name, where) if len(starts) and (~nan[starts]).any() else []


def _row_count(table: pa.Table, offsets: np.ndarray, flags: np.ndarray, column: str, of: str, where: str) -> list[str]:
    if column not in table.column_names:
        return []
    sums = np.add.reduceat(flags.astype(np.int64), offsets[:-1]) if len(flags) else np.zeros(len(offsets) - 1, np.int64)
    sums = np.where(offsets[:-1] < offsets[1:], sums, 0)  # reduceat gives an empty row the next element
    bad = np.flatnonzero(sums != table.column(column).to_numpy())
    if not len(bad):
        return []
    ids = table.column("sample_id").to_pylist()
    return [f"row counts: '{column}' is not the number of true entries of {of} in {example([ids[i] for i in bad], len(bad), where)}"]


def _export_problems(table: pa.Table, where: str, trainable: pa.ChunkedArray | None) -> list[str]:
    ids, offsets = flat_lists(table, "input_ids")
    labels, _ = flat_lists(table, "labels")
    mask, _ = flat_lists(table, "attention_mask")
    problems = []
    labelled = labels != IGNORE_INDEX
    problems += _position_zero(table, offsets, labelled, "labels", where)
    problems += _off_targets(table, offsets, labelled, trainable, "labels off the targets: a label where trainable is false",
                             where)
    wrong = labelled & (labels != ids)
    if wrong.any():
        rows = rows_where(table, offsets, wrong)
        problems.append(f"labels: a label is neither -100 nor its token in {example(rows, len(rows), where)}")
    if (mask != 1).any():
        rows = rows_where(table, offsets, mask != 1)
        problems.append(f"attention mask: not 1 at every token in {example(rows, len(rows), where)}")
    if "weights" in table.column_names:
        problems += weight_problems(table, "weights", labelled, offsets, trainable, where)
    return problems + _row_count(table, offsets, labelled, "n_kept", "labels != -100", where)
