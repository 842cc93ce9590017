"""Build small tokenized corpora directly (no `sstoken prepare`) for scoring tests and benchmarks.

Rows are ChatML conversations rendered piece by piece with a tokenizer: context tokens (markup,
user turns) are not trainable; each assistant turn's content and its `<|im_end|>` are.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from pipeline.runtime.files import base_manifest, shard_name, write_manifest, write_parquet_atomic
from pipeline.runtime.fingerprint import sha256_json, tokenizer_fingerprints
from pipeline.runtime.schemas import table_from_rows

WORDS = (
    "the quick brown fox jumps over lazy dog what is capital of france paris tokens are selected by "
    "retrospective excess loss and attention importance numbers 0 1 2 3 4 5 6 7 8 9 hello how can i help"
).split()


def _text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(low, high)))


def conversation_row(tokenizer: Any, sample_id: str, rng: random.Random, turns: int = 1, scale: int = 1) -> dict[str, Any]:
    """One tokenized sample with `turns` user/assistant exchanges; `scale` stretches the texts."""
    ids: list[int] = []
    trainable: list[bool] = []

    def add(text: str, is_target: bool) -> None:
        pieces = tokenizer.encode(text, add_special_tokens=False)
        ids.extend(pieces)
        trainable.extend([is_target] * len(pieces))

    for _ in range(turns):
        add("<|im_start|>user\n" + _text(rng, 3 * scale, 12 * scale) + "<|im_end|>\n", False)
        add("<|im_start|>assistant\n", False)
        add(_text(rng, 2 * scale, 15 * scale), True)
        add("<|im_end|>", True)
        add("\n", False)
    return {
        "sample_id": sample_id,
        "source": "factory",
        "input_ids": ids,
        "trainable": trainable,
        "n_tokens": len(ids),
        "n_trainable": sum(trainable),
        "n_turns": turns,
        "truncated": False,
    }


# Shard sizes of the session's scored corpus (tests/conftest.py `scored_corpus`); tests name them in messages
# such as "part-00001.parquet has 99 rows, the file has 7".
SCORED_SHARDS = [4, 7, 3, 6]


def write_tokenized(
    folder: Path, tokenizer: Any, shard_rows: list[int], seed: int = 0, scale: int = 1
) -> Path:
    """A tokenized artifact folder: one shard per entry of `shard_rows` (its row count) + manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    shards, samples, tokens, trainable = [], 0, 0, 0
    for index, count in enumerate(shard_rows):
        rows = [
            conversation_row(tokenizer, f"s{index:02d}-{row:04d}", rng, turns=1 + (row % 3 == 2), scale=scale)
            for row in range(count)
        ]
        name = shard_name(index)
        digest = write_parquet_atomic(table_from_rows(rows, "tokenized"), folder / name)
        shards.append({"file": name, "rows": count, "sha256": digest})
        samples += count
        tokens += sum(r["n_tokens"] for r in rows)
        trainable += sum(r["n_trainable"] for r in rows)
    fingerprints = tokenizer_fingerprints(tokenizer)
    manifest = base_manifest("tokenized", {"factory": "tests.factories.write_tokenized", "seed": seed}) | {
        "tokenizer": {
            "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
            "fingerprint": fingerprints["tokenizer"],
            "chat_template_fingerprint": fingerprints["chat_template"],
        },
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "shards": shards,
        "counts": {"rows_written": samples, "tokens": tokens, "trainable_tokens": trainable},
    }
    write_manifest(folder, manifest)
    return folder


def write_keep_masks(
    folder: Path, tokenized: Path, ratio: float = 0.5, seed: int = 0, kind: str = "scores", shift_length: int = 0,
    keep_off_targets: str | None = None, weights: str | None = None,
) -> Path:
    """A minimal masks artifact (kind scores or masks) for `tokenized`: each trainable token kept with
    probability `ratio` (seeded); `shift_length` adds that many entries to every mask, and `keep_off_targets`
    ("position 0" or "prompt") keeps that token of the first sample (broken artifacts, consistently sealed).
    `weights`: no weight column (None, as written before weights existed), "ones" (1 where kept) or "random"
    (seeded, in [0.25, 2) where kept), 0 elsewhere."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.runtime.files import read_manifest

    folder, tokenized = Path(folder), Path(tokenized)
    folder.mkdir(parents=True, exist_ok=True)
    source = read_manifest(tokenized, kind="tokenized")
    rng = random.Random(seed)
    shards = []
    for entry in source["shards"]:
        rows = pq.read_table(tokenized / entry["file"], columns=["sample_id", "trainable"]).to_pylist()
        keep = [[t and rng.random() < ratio for t in row["trainable"]] + [False] * shift_length for row in rows]
        if keep_off_targets is not None and not shards:
            keep[0][0 if keep_off_targets == "position 0" else rows[0]["trainable"].index(False, 1)] = True
        columns = {}
        if weights is not None:
            columns["weight"] = pa.array([[(1.0 if weights == "ones" else 0.25 + 1.75 * rng.random()) if k else 0.0
                                           for k in row] for row in keep], type=pa.list_(pa.float32()))
        table = pa.table({
            "sample_id": [row["sample_id"] for row in rows],
            "keep": pa.array(keep, type=pa.list_(pa.bool_())),
            **columns,
            "n_kept": pa.array([sum(k) for k in keep], type=pa.int32()),
            "n_trainable": pa.array([sum(row["trainable"]) for row in rows], type=pa.int32()),
        })
        digest = write_parquet_atomic(table, folder / entry["file"])
        shards.append({"file": entry["file"], "rows": table.num_rows, "sha256": digest})
    data_key = sha256_json([[s["file"], s["sha256"]] for s in source["shards"]])
    manifest = base_manifest(kind, {"factory": "tests.factories.write_keep_masks", "ratio": ratio, "seed": seed}) | {
        "tokenizer": source["tokenizer"],
        "input_fingerprint": data_key,
        "inputs": [{"kind": "tokenized", "path": str(tokenized), "data_fingerprint": data_key}],
        "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
        "shards": shards,
        "counts": {"samples": sum(s["rows"] for s in shards)},
    }
    write_manifest(folder, manifest)
    return folder


def kill_on_commit(monkeypatch: Any, module: Any, number: int) -> list[str]:
    """Make `module.commit_shard` raise KeyboardInterrupt ("killed") at its `number`-th call, as a kill
    mid-run would; the calls' file names are recorded in the returned list (use a `pytest.MonkeyPatch.context()`)."""
    commit, calls = module.commit_shard, []

    def dies(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[1])
        if len(calls) == number:
            raise KeyboardInterrupt("killed")
        return commit(*args, **kwargs)

    monkeypatch.setattr(module, "commit_shard", dies)
    return calls
