"""Per-shard work of the score job: check a shard, fill its history cache, score it, re-select its keep masks.

Plain functions of one `ShardTask` that Ray runs in its workers (actors for scoring, tasks for
the rest). This module imports no torch, so the validation and selection tasks start quickly;
scoring imports the engine only when it runs.

A shard counts as scored when its `_progress/<name>.json` record carries the run's key (scoring
settings except the keep ratio, checkpoint and data fingerprints, the input shard's checksum) and
the file's sha256, row count, schema and sample ids all check out. Its keep masks are current when
the record's `selection` also matches; otherwise only they are rewritten, from the stored scores.
The output is written first (temporary name, then a rename), the record second, so a crash between
the two only costs a redo.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import global_selection
from pipeline.artifacts.files import MANIFEST, ArtifactError, read_shard, write_json_atomic, write_parquet_atomic
from pipeline.core.fingerprint import sha256_file
from pipeline.artifacts.history_cache import history_cache_dir, load_cached_history, store_history
from pipeline.engine.keep_tables import per_sample_keep
from pipeline.artifacts.schemas import arrow_schema, validate_table

PROGRESS = "_progress"


class ScoreJobError(RuntimeError):
    """A scoring job that cannot run or complete; the message names the input and what to do."""


@dataclass(frozen=True)
class ShardTask:
    """One input shard and everything a worker needs to score it or check it."""

    file: str
    input_path: str
    input_sha256: str
    rows: int
    output_path: str
    record_path: str
    run_key: str
    data_fingerprint: str
    history_cache: str


def read_record(task: ShardTask) -> dict[str, Any] | None:
    try:
        return json.loads(Path(task.record_path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def verify_input(task: ShardTask) -> None:
    path = Path(task.input_path)
    if not path.is_file():
        raise ArtifactError(f"tokenized shard {path} is missing; rerun `sstoken prepare` for {path.parent}")
    if sha256_file(path) != task.input_sha256:
        raise ArtifactError(
            f"tokenized shard {path} does not match the checksum in {path.parent / MANIFEST}; "
            "it changed or is corrupt: rerun `sstoken prepare`"
        )


def completed_record(task: ShardTask) -> dict[str, Any] | None:
    """The shard's progress record when its output is complete and valid for this run, else None.

    Valid: the record carries this run's key; the file's sha256 equals the record's; it reads as
    Parquet with the scores schema and the input's row count and sample ids, in the same order.
    """
    record = read_record(task)
    path = Path(task.output_path)
    if record is None or record.get("run_key") != task.run_key or not path.is_file():
        return None
    if sha256_file(path) != record.get("sha256") or record.get("rows") != task.rows:
        return None
    try:
        metadata = pq.read_metadata(path)
        if metadata.num_rows != task.rows or not metadata.schema.to_arrow_schema().equals(arrow_schema("scores")):
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
    return history_cache_dir(Path(task.history_cache), history_fingerprint, task.data_fingerprint, dtype)


def history_missing(task: ShardTask, history_fingerprint: str, dtype: str) -> bool:
    """True when the shard has no valid cached history NLLs (absent, unreadable or malformed)."""
    return load_cached_history(history_folder(task, history_fingerprint, dtype), task.file) is None


def fill_history_cache(scorer: Any, task: ShardTask) -> dict[str, Any]:
    """Phase 1 for one shard: its history NLLs with a Scorer that holds only the history model
    (`pipeline.engine.scorer.history_scorer`), stored atomically; skipped when a valid cache file exists."""
    from pipeline.engine.scorer import history_nll_table

    started = time.monotonic()
    folder = history_folder(task, scorer.current_fingerprint, scorer.dtype_name)  # its model IS the history
    if load_cached_history(folder, task.file) is not None:
        return {"file": task.file, "tokens": 0, "seconds": time.monotonic() - started, "computed": False}
    tokenized = read_shard(Path(task.input_path), "tokenized")
    store_history(folder, task.file, history_nll_table(scorer, tokenized))
    tokens = int(pc.sum(pc.list_value_length(tokenized.column("input_ids"))).as_py() or 0)
    return {"file": task.file, "tokens": tokens, "seconds": time.monotonic() - started, "computed": True}


def score_one_shard(scorer: Any, task: ShardTask) -> dict[str, Any]:
    """Score one shard with a loaded `Scorer`, write it atomically, then its progress record.

    History NLLs come from the cache when it holds them (phase 1 filled it); otherwise the Scorer
    runs the history forward itself (loading that model lazily) and the result is cached."""
    from pipeline.engine.scorer import score_shard

    started = time.monotonic()
    tokenized = read_shard(Path(task.input_path), "tokenized")
    cache = None
    if scorer.uses_history:
        cache = history_folder(task, scorer.history_fingerprint, scorer.dtype_name)
    cached = load_cached_history(cache, task.file) if cache is not None else None
    scores, history = score_shard(scorer, tokenized, cached)
    if history is not None:
        store_history(cache, task.file, history)
    validate_table(scores, "scores", source=f"scores of {task.input_path}")
    if not scores.column("sample_id").equals(tokenized.column("sample_id")):
        raise ScoreJobError(f"scores of {task.input_path} do not list its samples in order; this is a bug")
    digest = write_parquet_atomic(scores, Path(task.output_path))
    record = {
        "file": task.file,
        "rows": scores.num_rows,
        "sha256": digest,
        "run_key": task.run_key,
        "selection": sample_selection(scorer.settings.ratio),
        "dtype": scorer.dtype_name,
        "device": scorer.device.type,
        "tokens": int(pc.sum(scores.column("n_tokens")).as_py() or 0),
        "trainable": int(pc.sum(scores.column("n_trainable")).as_py() or 0),
        "kept": int(pc.sum(scores.column("n_kept")).as_py() or 0),
    }
    write_json_atomic(record, Path(task.record_path))
    return {
        "record": record,
        "tokens": record["tokens"],
        "seconds": time.monotonic() - started,
        "history_cached": cached is not None,
    }


def sample_selection(ratio: float) -> dict[str, Any]:
    """The `selection` a progress record carries for per-sample keep masks at `ratio`."""
    return {"granularity": "sample", "ratio": ratio}


def _rewrite_keep(
    task: ShardTask, selection: dict[str, Any], select: Callable[[pa.Table, pa.ChunkedArray], pa.Table]
) -> dict[str, Any]:
    """Rewrite one score shard's keep masks from its stored scores, exactly once: skipped when its
    record already carries `selection` and the file still has the recorded checksum."""
    record = read_record(task)
    if record is None:
        raise ScoreJobError(f"{task.record_path} vanished during the selection; rerun the job")
    path = Path(task.output_path)
    if record.get("selection") == selection and sha256_file(path) == record["sha256"]:
        return record
    # The canonical schema again (Parquet reads lists back with other child names), so a rewritten
    # shard is byte-identical to one scored at these settings from scratch.
    scores = read_shard(path, "scores").cast(arrow_schema("scores"))
    trainable = pq.read_table(task.input_path, columns=["sample_id", "trainable"])
    if not scores.column("sample_id").equals(trainable.column("sample_id")):
        raise ScoreJobError(f"{path} and {task.input_path} list different samples; rerun the job")
    table = select(scores, trainable.column("trainable"))
    record = record | {
        "sha256": write_parquet_atomic(table, path),
        "selection": selection,
        "kept": int(pc.sum(table.column("n_kept")).as_py() or 0),
    }
    write_json_atomic(record, Path(task.record_path))
    return record


def rewrite_global_keep(task: ShardTask, selection: dict[str, Any]) -> dict[str, Any]:
    """Pass 4 of the global selection for one shard (threshold and tie quota in `selection`)."""
    threshold = selection["threshold"]
    key = None if threshold is None else threshold["key"]
    return _rewrite_keep(
        task, selection, lambda scores, trainable: global_selection.apply_threshold(scores, trainable, key, selection["ties"])
    )


def reselect_sample_keep(task: ShardTask, ratio: float) -> dict[str, Any]:
    """Per-sample keep masks at a new `ratio` from the shard's stored scores: no model runs."""
    return _rewrite_keep(task, sample_selection(ratio), lambda scores, trainable: per_sample_keep(scores, trainable, ratio))
