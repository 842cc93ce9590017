"""Synthetic scored corpora, built with numpy and pyarrow in one pass (no model runs), for the stats API,
`sstoken report` / `sstoken inspect` tests and the report benchmark.

    tokenized = write_synthetic_tokenized(folder / "tokenized", tokenizer_dir, samples=100_000)
    scores = write_synthetic_scores(folder / "scores", tokenized, seed=0)
    run = write_synthetic_run(folder / "run", tokenizer_dir, samples=40, rounds=2)

Each sample is a context prefix followed by one response (the trainable tokens); the signals are
drawn at random, `score` is what the sstoken method would rank (gamma 0.5 of the per-sample
normalised REL and the attention), and `keep` its top `ratio` of each sample's targets (ties by
position), so the folders look like what `sstoken score` writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.loop.run_folder import RunFolder, write_run_record
from pipeline.runtime.files import base_manifest, shard_name, write_manifest, write_parquet_atomic
from pipeline.runtime.fingerprint import sha256_json
from pipeline.runtime.schemas import arrow_schema, present_schema, table_from_rows

SOURCES = ("alpaca", "code", "math")
REJECTED_ROWS = [
    {"input_file": "corpus.jsonl", "locator": "line 3", "sample_id": None, "reason": "invalid_json", "detail": "line 3 is not JSON"},
    {"input_file": "corpus.jsonl", "locator": "line 9", "sample_id": "dup", "reason": "duplicate", "detail": "same as line 2"},
    {"input_file": "corpus.jsonl", "locator": "line 11", "sample_id": "dup2", "reason": "duplicate", "detail": "same as line 4"},
]


def _lists(offsets: np.ndarray, values: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _fingerprints(tokenizer_dir: Path) -> dict[str, str]:
    from tokenizers import Tokenizer

    text = Tokenizer.from_file(str(Path(tokenizer_dir) / "tokenizer.json")).to_str()
    return {"tokenizer": sha256_json(text), "chat_template": sha256_json("chatml")}


def write_synthetic_tokenized(
    folder: Path, tokenizer_dir: Path, samples: int, seed: int = 0, mean_tokens: int = 200, rows_per_shard: int = 20_000,
    vocab: int = 400, rejected: bool = True,
) -> Path:
    """A tokenized folder of `samples` random samples (ids below `vocab`), sources in turn from SOURCES."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(8, mean_tokens // 4), mean_tokens * 7 // 4 + 8, size=samples)
    contexts = np.maximum(2, (lengths * rng.uniform(0.15, 0.5, size=samples)).astype(np.int64))
    shards = []
    for index, start in enumerate(range(0, samples, rows_per_shard)):
        stop = min(samples, start + rows_per_shard)
        length, context = lengths[start:stop], contexts[start:stop]
        offsets = np.concatenate([[0], np.cumsum(length)])
        position = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length)
        trainable = position >= np.repeat(context, length)
        arrays = {
            "sample_id": pa.array([f"s{row:07d}" for row in range(start, stop)], pa.string()),
            "source": pa.array([SOURCES[row % len(SOURCES)] for row in range(start, stop)], pa.string()),
            "input_ids": _lists(offsets, rng.integers(3, vocab, size=offsets[-1]), pa.int32()),
            "trainable": _lists(offsets, trainable, pa.bool_()),
            "n_tokens": pa.array(length, pa.int32()),
            "n_trainable": pa.array(length - context, pa.int32()),
            "n_turns": pa.array(np.ones(stop - start), pa.int32()),
            "truncated": pa.array(np.zeros(stop - start, bool), pa.bool_()),
        }
        table = pa.Table.from_arrays(list(arrays.values()), schema=arrow_schema("tokenized"))
        digest = write_parquet_atomic(table, folder / shard_name(index))
        shards.append({"file": shard_name(index), "rows": stop - start, "sha256": digest})
    fingerprints = _fingerprints(tokenizer_dir)
    manifest = base_manifest("tokenized", {"factory": "tests.score_factories", "seed": seed}) | {
        "tokenizer": {"name_or_path": str(tokenizer_dir), "fingerprint": fingerprints["tokenizer"],
                      "chat_template_fingerprint": fingerprints["chat_template"]},
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "shards": shards,
        "counts": {"rows_read": samples + (len(REJECTED_ROWS) if rejected else 0), "rows_written": samples,
                   "rows_rejected": len(REJECTED_ROWS) if rejected else 0,
                   "tokens": int(lengths.sum()), "trainable_tokens": int((lengths - contexts).sum())},
    }
    if rejected:
        digest = write_parquet_atomic(table_from_rows(REJECTED_ROWS, "rejected"), folder / "rejected.parquet")
        manifest["rejected"] = {"file": "rejected.parquet", "rows": len(REJECTED_ROWS), "sha256": digest}
        manifest["rejected_by_reason"] = {"invalid_json": 1, "duplicate": 2}
    write_manifest(folder, manifest)
    return folder


def _keep_top(score: np.ndarray, trainable: np.ndarray, sample: np.ndarray, ratio: float) -> np.ndarray:
    """Per sample, the top `ratio` of the targets by score (ties by position): what per-sample selection keeps."""
    order = np.lexsort((np.arange(len(score)), -np.where(trainable, score, -np.inf), sample))
    starts = np.searchsorted(sample[order], sample[order], side="left")
    rank = np.arange(len(order)) - starts
    targets = np.bincount(sample, weights=trainable, minlength=sample.max() + 1 if len(sample) else 0)
    quota = np.floor(targets * ratio + 0.5).astype(np.int64)
    keep = np.zeros(len(score), bool)
    keep[order] = (rank < quota[sample[order]]) & trainable[order]
    return keep


def _signals(trainable: np.ndarray, sample: np.ndarray, rng: np.random.Generator, ratio: float) -> dict[str, np.ndarray]:
    n = len(trainable)
    nll_cur = rng.gamma(2.0, 1.0, size=n).astype(np.float32)
    nll_hist = (nll_cur + rng.normal(0.3, 0.8, size=n)).clip(0).astype(np.float32)
    rel = nll_hist - nll_cur
    attn = rng.beta(2.0, 5.0, size=n).astype(np.float32)
    rel_n = np.clip((rel + 2.0) / 5.0, 0.0, 1.0)
    score = (0.5 * rel_n + 0.5 * attn).astype(np.float32)
    off = ~trainable
    for values in (nll_cur, nll_hist, rel, score):
        values[off] = np.nan
    attn[off] = np.nan
    keep = _keep_top(score, trainable, sample, ratio)
    entropy = np.where(trainable, 0.5 * nll_cur + attn, np.nan).astype(np.float32)  # no draw: the others stay as they were
    return {"nll_cur": nll_cur, "nll_hist": nll_hist, "rel": rel.astype(np.float32), "attn": attn, "entropy_cur": entropy,
            "score": score, "keep": keep}


def write_synthetic_scores(folder: Path, tokenized: Path, seed: int = 0, ratio: float = 0.6, kind: str = "scores") -> Path:
    """A scores folder (or, `kind="masks"`, a masks folder) for `tokenized`, shard by shard as `sstoken score` names them."""
    import pyarrow.parquet as pq

    from pipeline.runtime.files import read_manifest

    folder, tokenized = Path(folder), Path(tokenized)
    folder.mkdir(parents=True, exist_ok=True)
    source = read_manifest(tokenized, kind="tokenized")
    rng = np.random.default_rng(seed + 1000)
    shards, kept, trainable_total = [], 0, 0
    for entry in source["shards"]:
        table = pq.read_table(tokenized / entry["file"], columns=["sample_id", "trainable", "n_tokens", "n_trainable"])
        lists = table.column("trainable").combine_chunks()
        trainable = lists.values.to_numpy(zero_copy_only=False)
        lengths = table.column("n_tokens").to_numpy()
        sample = np.repeat(np.arange(len(lengths)), lengths)
        signals = _signals(trainable, sample, rng, ratio)
        offsets = lists.offsets.to_numpy()
        n_kept = np.bincount(sample, weights=signals["keep"], minlength=len(lengths)).astype(np.int32)
        columns: dict[str, Any] = {"sample_id": table.column("sample_id").combine_chunks()}
        for name, values in signals.items():
            columns[name] = _lists(offsets, values, pa.bool_() if name == "keep" else pa.float32())
        columns |= {"n_tokens": table.column("n_tokens").combine_chunks(), "n_trainable": table.column("n_trainable").combine_chunks(),
                    "n_kept": pa.array(n_kept, pa.int32()),
                    "weight": _lists(offsets, signals["keep"].astype(np.float32), pa.float32())}  # masks: binary, weight = keep
        present = present_schema(kind, list(columns))  # masks: no step (the online trainer's column)
        out = pa.Table.from_arrays([columns[field.name] for field in present], schema=present)
        digest = write_parquet_atomic(out, folder / entry["file"])
        shards.append({"file": entry["file"], "rows": out.num_rows, "sha256": digest})
        kept += int(n_kept.sum())
        trainable_total += int(trainable.sum())
    data_key = sha256_json([[s["file"], s["sha256"]] for s in source["shards"]])
    manifest = base_manifest(kind, {"factory": "tests.score_factories", "seed": seed, "ratio": ratio}) | {
        "tokenizer": source["tokenizer"],
        "input_fingerprint": data_key,
        "inputs": [{"kind": "tokenized", "path": str(tokenized), "data_fingerprint": data_key}],
        "checkpoints": {"current": {"path": "synthetic-current", "fingerprint": "c" * 16},
                        "history": {"path": "synthetic-history", "fingerprint": "h" * 16}},
        "selection": {"method": "sstoken", "ratio": ratio, "granularity": "sample", "gamma": 0.5,
                      "normalise": "per_sample", "excess": "history_minus_current", "layer": -1},
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "shards": shards,
        "counts": {"samples": sum(s["rows"] for s in shards), "trainable": trainable_total, "kept": kept},
    }
    write_manifest(folder, manifest)
    return folder


def write_synthetic_run(
    folder: Path, tokenizer_dir: Path, samples: int = 40, rounds: int = 2, steps: int = 4, history: str = "base"
) -> Path:
    """A run folder as `sstoken run` leaves it (no checkpoints): tokenized/, per round scores/, masks/ (a masks
    folder beside the scores), train/metrics.jsonl, and run.json naming them."""
    folder = Path(folder)
    tokenized = write_synthetic_tokenized(folder / "tokenized", tokenizer_dir, samples=samples, mean_tokens=40)
    entries = []
    for index in range(rounds):
        round_dir = folder / "rounds" / f"r{index:03d}"
        write_synthetic_scores(round_dir / "scores", tokenized, seed=index)
        masks = write_synthetic_scores(round_dir / "masks", tokenized, seed=index, kind="masks")
        masks_manifest = json.loads((masks / "manifest.json").read_text())
        masks_manifest["inputs"].insert(0, {"kind": "scores", "path": str(round_dir / "scores"), "data_fingerprint": "x"})
        write_manifest(masks, masks_manifest)
        (round_dir / "train").mkdir(parents=True)
        lines = [{"step": index * steps + step + 1, "loss": 3.0 - 0.1 * (index * steps + step), "kept_tokens": 10}
                 for step in range(steps)]
        (round_dir / "train" / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        entries.append({
            "round": index, "epoch": 0, "slice": index, "samples": samples, "status": "done", "stages": {},
            "data": "tokenized", "scores": f"rounds/r{index:03d}/scores", "masks": f"rounds/r{index:03d}/masks",
            "checkpoint": f"rounds/r{index:03d}/train/checkpoint", "selection": {"method": "sstoken", "ratio": 0.6},
            "history": {"path": "base", "fingerprint": "h" * 16, "policy": history},
            "summary": {"train_loss": 3.0 - 0.1 * index, "kept": None, "trainable": None, "kept_ratio": 0.6,
                        "history_computed": 0, "history_reused": 0, "score_s": 1.0, "select_s": 0.1, "train_s": 2.0,
                        "rescore_to_train": 0.5},
        })
    record = {
        "version": 1, "created_at": "2026-01-01T00:00:00+00:00", "status": "done", "identity": "synthetic",
        "settings": {}, "config": {"rounds": rounds, "history": history}, "round_unit": "slice",
        "history": {"policy": history}, "selection": {"method": "sstoken", "ratio": 0.6},
        "models": {"base": {"path": "base", "fingerprint": "b" * 16}, "reference": None}, "rounds": entries,
    }
    write_run_record(RunFolder(folder), record)  # checked against schemas/run.v1.schema.json, as the loop writes it
    return folder


def as_written_before(folder: Path, columns: tuple[str, ...], signals: tuple[str, ...] = ()) -> Path:
    """A scores or masks folder, changed in place to what an older sstoken wrote: its shards without `columns`, the
    manifest without `signals` keys in its `signals` section (nor the progress records), the checksums (manifest, data fingerprint, progress
    records, where there) resealed."""
    import pyarrow.parquet as pq

    from pipeline.runtime.files import read_manifest, write_json_atomic
    from pipeline.runtime.stage_output import read_record, record_path

    manifest = read_manifest(folder)
    for entry in manifest["shards"]:
        path = folder / entry["file"]
        entry["sha256"] = write_parquet_atomic(pq.read_table(path).drop_columns(list(columns)), path)
        record = read_record(folder, entry["file"])
        if record is not None:  # the keys of `signals` a shard's record carries (vocab_size) were not there either
            record = {k: v for k, v in record.items() if k not in signals} | {"sha256": entry["sha256"]}
            write_json_atomic(record, record_path(folder, entry["file"]))
    manifest["data_fingerprint"] = sha256_json([[s["file"], s["sha256"]] for s in manifest["shards"]])
    for key in signals:
        manifest.get("signals", {}).pop(key, None)
    write_manifest(folder, manifest)
    return folder
