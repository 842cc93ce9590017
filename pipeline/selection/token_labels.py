"""Token labels: which tokens of each sample are known to be bad, the input of the `oracle` selection.

    write_token_labels(path, sample_ids, drop)   # one parquet file (`schemas/token_labels.v1.json`)
    read_token_labels(path) -> {sample_id: drop}  # cached by the file's path, size and modification time

The oracle is a yardstick, not a method: it knows the ground truth (the eval's corrupted tokens)
and shows what a selection could gain at most under the same budget. The labels follow the
alignment contract: one flag per token of the sample, false at every context token.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.runtime.schemas import arrow_schema

KIND = "token_labels"


def write_token_labels(path: Path, sample_ids: Sequence[str], drop: Sequence[Sequence[bool]]) -> None:
    """The labels file, written whole under a temporary name, then renamed."""
    if len(sample_ids) != len(drop) or len(set(sample_ids)) != len(sample_ids):
        raise UserError(f"token labels for {path}: {len(sample_ids)} sample ids (each once) need as many drop lists")
    table = pa.Table.from_pydict({"sample_id": list(sample_ids), "drop": [list(map(bool, d)) for d in drop]},
                                 schema=arrow_schema(KIND))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(path).with_name(Path(path).name + ".partial")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


@lru_cache(maxsize=4)
def _read(path: str, size: int, modified_ns: int) -> dict[str, np.ndarray]:
    try:
        table = pq.read_table(path, columns=["sample_id", "drop"])
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"select.labels {path} is not a token labels file (sample_id, drop): {error}") from None
    if table.schema.field("drop").type != pa.list_(pa.bool_()) or table.column("drop").null_count:
        raise UserError(f"select.labels {path}: column 'drop' must be list<bool> without nulls")
    ids = table.column("sample_id").to_pylist()
    return dict(zip(ids, (np.asarray(row, dtype=bool) for row in table.column("drop").to_pylist())))


def read_token_labels(path: Path) -> dict[str, np.ndarray]:
    """sample_id -> drop flags of a labels file; a missing or malformed file is one error naming it."""
    if not Path(path).is_file():
        raise UserError(f"select.labels {path} does not exist; the oracle selection needs a token labels file")
    stat = Path(path).stat()
    return _read(str(path), stat.st_size, stat.st_mtime_ns)


def sample_drop(labels: dict[str, np.ndarray], sample_id: str, trainable: np.ndarray, source: Path) -> np.ndarray:
    """One sample's drop flags, checked to line up with its tokens (same length, set on targets only)."""
    drop = labels.get(sample_id)
    if drop is None:
        raise UserError(f"sample {sample_id!r} has no row in the token labels {source}; label every sample of the corpus")
    if len(drop) != len(trainable) or (drop & ~trainable).any():
        raise UserError(
            f"sample {sample_id!r}: the token labels in {source} do not line up with its tokens ({len(drop)} flags for "
            f"{len(trainable)} tokens, or a flag on a non-target); label the tokenized corpus the run prepares"
        )
    return drop
