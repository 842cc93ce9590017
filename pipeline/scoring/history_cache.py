"""Cache of a history checkpoint's per-token NLLs over one tokenized corpus.

A fixed history model (the base model, say) gives the same NLLs every round, so they are computed
once and stored under a folder keyed by everything that determines them: the checkpoint
fingerprint, the tokenized data's key and the compute dtype. The data key is a digest of the
tokenized shards' checksums, each verified against its file before use (`sstoken score`), never
the manifest's editable data_fingerprint: a changed shard never meets stale NLLs. One Parquet file per
tokenized shard, same file name, written atomically; an unreadable or malformed file counts as
absent and is recomputed.
"""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.runtime.files import write_parquet_atomic
from pipeline.runtime.schemas import SchemaError, validate_table

_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


def _component(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"history cache key: {what} is empty")
    return _SAFE.sub("_", value)


def history_cache_dir(cache_root: Path, checkpoint_fp: str, data_fp: str, dtype: str) -> Path:
    """The folder holding one (history checkpoint, tokenized data, dtype) combination's NLLs."""
    return (
        Path(cache_root)
        / "history_nll"
        / _component(checkpoint_fp, "checkpoint fingerprint")
        / _component(data_fp, "data fingerprint")
        / _component(dtype, "dtype")
    )


def load_cached_history(folder: Path, shard_file: str) -> pa.Table | None:
    """The cached table for one shard, or None when it is absent, unreadable or not history_nll.v1."""
    path = Path(folder) / shard_file
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
        validate_table(table, "history_nll", source=str(path))
    except (pa.ArrowException, OSError, SchemaError):
        return None
    return table


def store_history(folder: Path, shard_file: str, table: pa.Table) -> None:
    """Validate and write one shard's history NLLs atomically (readers never see a partial file)."""
    validate_table(table, "history_nll", source=f"history NLLs for {shard_file}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(table, Path(folder) / shard_file)
