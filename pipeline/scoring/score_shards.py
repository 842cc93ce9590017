"""Per-shard work of the score job: check a shard, fill its history cache, score it.

Plain functions of one `ShardTask` that Ray runs in its workers (actors for scoring, tasks for
the rest). This module imports no torch, so the validation and selection tasks start quickly;
scoring imports the engine only when it runs.

A shard counts as scored when its `_progress/<name>.json` record carries the run's key (scoring
settings and the signals computed, not the selection settings; checkpoint fingerprints, the
verified checksums of the tokenized shards) and the file's sha256, row count, schema and sample
ids all check out. Its keep masks are current when the record's `selection` also matches;
otherwise only they are rewritten, from the stored signals (`pipeline.selection.selection_shards`).
Every write goes through `pipeline.runtime.stage_output.commit_shard` (temporary name, record,
rename), so a crash anywhere only costs a redo.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_shard, verify_listed_shard
from pipeline.runtime.schemas import arrow_schema, validate_table
from pipeline.runtime.stage_output import commit_shard, completed_record as committed_record
from pipeline.scoring.history_cache import history_cache_dir, load_cached_history, store_history
from pipeline.scoring.score_settings import signals_to_compute
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection_shards import selection_record

@dataclass(frozen=True)
class ShardTask:
    """One input shard and everything a worker needs to score it or check it."""

    file: str
    input_path: str
    input_sha256: str
    rows: int
    output_dir: str
    run_key: str
    data_key: str  # digest of the tokenized shards' verified checksums: keys the history cache
    history_cache: str
    cache_current: bool = False  # also store the current checkpoint's NLLs in the history cache

    @property
    def output_path(self) -> str:
        return str(Path(self.output_dir) / self.file)


def verify_input(task: ShardTask) -> None:
    """Refuse a tokenized shard that is missing or differs from its manifest entry (checksum, rows)."""
    path = Path(task.input_path)
    verify_listed_shard(path.parent, {"file": path.name, "sha256": task.input_sha256, "rows": task.rows})


def completed_record(task: ShardTask) -> dict[str, Any] | None:
    """The shard's progress record when its output is complete and valid for this run, else None.

    Valid: committed under this run's key with the file's sha256 and row count (`stage_output`);
    the input's row count, the scores schema and the input's sample ids, in the same order.
    """
    record = committed_record(Path(task.output_dir), task.file, task.run_key)
    path = Path(task.output_path)
    if record is None or record.get("rows") != task.rows:
        return None
    try:
        if not pq.read_schema(path).equals(arrow_schema("scores")):
            return None
        ids = pq.read_table(path, columns=["sample_id"]).column("sample_id")
        expected = pq.read_table(task.input_path, columns=["sample_id"]).column("sample_id")
    except (pa.ArrowException, OSError):
        return None
    return record if ids.equals(expected) else None


def check_shard(task: ShardTask) -> dict[str, Any] | None:
    """Validation pass: refuse a missing or corrupt input shard; return the output's record if done."""
    verify_input(task)
    return completed_record(task)


def history_folder(task: ShardTask, history_fingerprint: str, dtype: str) -> Path:
    """The history cache folder this shard's history NLLs go to (keyed by checkpoint, data, dtype)."""
    return history_cache_dir(Path(task.history_cache), history_fingerprint, task.data_key, dtype)


def history_missing(task: ShardTask, history_fingerprint: str, dtype: str) -> bool:
    """True when the shard has no valid cached history NLLs (absent, unreadable or malformed)."""
    return load_cached_history(history_folder(task, history_fingerprint, dtype), task.file) is None


def fill_history_cache(scorer: Any, task: ShardTask) -> dict[str, Any]:
    """Phase 1 for one shard: the history pass (a Scorer holding the history checkpoint), its NLLs
    stored atomically in the cache; skipped when a valid cache file exists."""
    from pipeline.scoring.scorer import nll_table

    started = time.monotonic()
    folder = history_folder(task, scorer.fingerprint, scorer.dtype_name)
    if load_cached_history(folder, task.file) is not None:
        return {"file": task.file, "tokens": 0, "seconds": time.monotonic() - started, "computed": False}
    tokenized = read_shard(Path(task.input_path), "tokenized")
    store_history(folder, task.file, nll_table(scorer, tokenized))
    tokens = int(pc.sum(pc.list_value_length(tokenized.column("input_ids"))).as_py() or 0)
    return {"file": task.file, "tokens": tokens, "seconds": time.monotonic() - started, "computed": True}


def store_current_nll(scores: pa.Table, folder: Path, shard_file: str) -> None:
    """Store a scores table's nll_cur column as the history_nll table of its checkpoint, unless already cached."""
    if load_cached_history(folder, shard_file) is None:
        nll = scores.select(["sample_id", "nll_cur"]).rename_columns(["sample_id", "nll"])
        store_history(folder, shard_file, nll.cast(arrow_schema("history_nll")))


def score_one_shard(
    scorer: Any, task: ShardTask, selection: SelectSettings, history_fingerprint: str | None
) -> dict[str, Any]:
    """Phase 2 for one shard: the current pass (a Scorer holding the current checkpoint), with the
    history NLLs phase 1 cached, and the per-sample selection; committed with its progress record.

    history_fingerprint: the history checkpoint whose cached NLLs REL needs; None when REL is not
    computed or current and history are the same checkpoint (REL is then 0)."""
    from pipeline.scoring.scorer import score_shard

    signals = signals_to_compute(scorer.settings.signals, selection)

    started = time.monotonic()
    tokenized = read_shard(Path(task.input_path), "tokenized")
    cached = None
    if signals.rel and history_fingerprint is not None:
        folder = history_folder(task, history_fingerprint, scorer.dtype_name)
        cached = load_cached_history(folder, task.file)
        if cached is None:
            raise UserError(
                f"the history NLLs of {task.file} are not in the cache {folder}, which phase 1 filled; is the cache "
                "folder shared by every node (--history-cache)? Rerun the job"
            )
    scores = score_shard(
        scorer, tokenized, selection, history_nll=cached, same_checkpoint=history_fingerprint is None,
        excess=scorer.settings.excess, signals=signals,
    )
    validate_table(scores, "scores", source=f"scores of {task.input_path}")
    if not scores.column("sample_id").equals(tokenized.column("sample_id")):
        raise UserError(f"scores of {task.input_path} do not list its samples in order; this is a bug")
    if task.cache_current:
        # The current pass's NLLs are this checkpoint's history NLLs (same batches, same kernels): a later
        # run that takes this checkpoint as its history model finds them cached. Stored before the commit,
        # so a committed shard has them unless the cache file was damaged since (then phase 1 redoes it).
        store_current_nll(scores, history_folder(task, scorer.fingerprint, scorer.dtype_name), task.file)
    record = {
        "run_key": task.run_key,
        "selection": selection_record(selection.within_shard()),
        "dtype": scorer.dtype_name,
        "device": scorer.device.type,
        "vocab_size": scorer.vocab_size,  # |V| of the entropy (entropy-gated's ln|V|), for the manifest and select
        "tokens": int(pc.sum(scores.column("n_tokens")).as_py() or 0),
        "trainable": int(pc.sum(scores.column("n_trainable")).as_py() or 0),
        "kept": int(pc.sum(scores.column("n_kept")).as_py() or 0),
    }
    record = commit_shard(Path(task.output_dir), task.file, scores, record)
    return {
        "record": record,
        "tokens": record["tokens"],
        "seconds": time.monotonic() - started,
        "history_cached": cached is not None,
    }
