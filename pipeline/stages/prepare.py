"""The prepare stage: a raw corpus becomes tokenized Parquet shards with a manifest.

Rows are read, normalised to chat messages, rendered with the tokenizer's chat template and
marked trainable; bad rows are set aside in `rejected.parquet` with a reason. Every row read is
either written or rejected (exact duplicates are rejected as `duplicate`, so each is kept once).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.artifacts.files import (
    MANIFEST,
    ArtifactError,
    base_manifest,
    exclusive_output,
    read_manifest,
    remove_stale_temporaries,
    shard_name,
    verify_shards,
    write_manifest,
    write_parquet_atomic,
)
from pipeline.core.chat import ChatRenderer, TemplateError, count_turns, load_chat_template
from pipeline.core.checkpoints import load_tokenizer
from pipeline.core.config import StageConfig
from pipeline.core.conversation import RowError, content_id, normalise_messages, row_id
from pipeline.core.corpus import InputRecord, InputSource, iter_records, resolve_inputs
from pipeline.core.fingerprint import files_fingerprint, sha256_json, tokenizer_fingerprints
from pipeline.artifacts.schemas import table_from_rows

logger = logging.getLogger(__name__)

REJECTED = "rejected.parquet"


class PrepareError(RuntimeError):
    """The prepare stage cannot produce a corpus (no valid row, or an unusable output folder)."""


class PrepareConfig(StageConfig):
    """Settings of `sstoken prepare`."""

    input: list[Path] = Field(description="Input files or folders: JSONL, JSON, Parquet, or a datasets save_to_disk folder.")
    tokenizer: str = Field(description="Tokenizer folder (usually the model folder) whose chat template renders the samples.")
    output: Path = Field(description="Output folder for part-NNNNN.parquet shards, rejected.parquet and manifest.json.")
    max_length: int | None = Field(2048, description="Longest sample in tokens; longer ones are handled per --on-overflow. None: no limit.")
    on_overflow: Literal["truncate", "reject"] = Field("truncate", description="What to do with samples over max_length.")
    rows_per_shard: int = Field(10_000, description="Samples per output shard.")
    chat_template: Path | None = Field(None, description="Jinja chat template file, for tokenizers without one (or to override it).")
    trust_remote_code: bool = Field(False, description="Allow the tokenizer folder's own Python code to run.")
    overwrite: bool = Field(False, description="Replace an output folder that holds a different prepared corpus.")

    @field_validator("max_length", "rows_per_shard")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError("must be at least 2")
        return value


@dataclass
class PrepareSummary:
    """What a prepare run did; `rows_read == rows_written + rows_rejected` always holds."""

    output: Path
    rows_read: int = 0
    rows_written: int = 0
    rows_rejected: int = 0
    rejected_by_reason: Counter = field(default_factory=Counter)
    inputs_without_rows: list[str] = field(default_factory=list)
    tokens: int = 0
    trainable_tokens: int = 0
    shards: int = 0
    reused: bool = False


def load_chat_tokenizer(config: PrepareConfig) -> Any:
    """The tokenizer folder's tokenizer, with a usable chat template installed."""
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    load_chat_template(tokenizer, config.chat_template, config.tokenizer)
    return tokenizer


def _ids_are_unique(sources: list[InputSource]) -> bool:
    """First pass: use the input's `id` column only if every id it holds is distinct."""
    seen: set[str] = set()
    for source in sources:
        for record in iter_records(source):
            identifier = row_id(record.row) if record.row is not None else None
            if identifier is None:
                continue
            if identifier in seen:
                logger.warning("id %r repeats; sample ids will be content hashes", identifier)
                return False
            seen.add(identifier)
    return bool(seen)


@dataclass
class _Sample:
    row: dict[str, Any] | None = None
    rejection: dict[str, Any] | None = None


class _SampleBuilder:
    """Turns input records into tokenized rows or rejections, remembering content seen so far."""

    def __init__(self, config: PrepareConfig, renderer: ChatRenderer, use_ids: bool):
        self.config = config
        self.renderer = renderer
        self.use_ids = use_ids
        self.first_with_content: dict[str, str] = {}

    def build(self, record: InputRecord) -> _Sample:
        sample_id = None

        def reject(reason: str, detail: str) -> _Sample:
            return _Sample(rejection=dict(input_file=record.input_file, locator=record.locator,
                                          sample_id=sample_id, reason=reason, detail=detail))

        if record.row is None:
            return reject(record.reason or "unreadable", record.detail or "")
        try:
            messages = normalise_messages(record.row)
        except RowError as error:
            return reject(error.reason, error.detail)
        content = content_id(messages)
        sample_id = (row_id(record.row) if self.use_ids else None) or content
        if content in self.first_with_content:
            return reject("duplicate", f"exact duplicate of sample {self.first_with_content[content]}")
        try:
            rendered = self.renderer.render(messages)
        except TemplateError as error:
            return reject("render_error", str(error))
        input_ids, trainable = rendered.input_ids, rendered.trainable
        limit = self.config.max_length
        truncated = limit is not None and len(input_ids) > limit
        if truncated:
            if self.config.on_overflow == "reject":
                return reject("too_long", f"{len(input_ids)} tokens, over max_length {limit}")
            input_ids, trainable = input_ids[:limit], trainable[:limit]
        n_trainable = sum(trainable)
        if n_trainable == 0:
            reason = "no_trainable_after_truncation" if truncated else "no_trainable_tokens"
            return reject(reason, f"no assistant token left within max_length {limit}" if truncated
                          else "the rendering has no assistant token")
        self.first_with_content[content] = sample_id
        source = record.row.get("source")
        return _Sample(row=dict(
            sample_id=sample_id,
            source=str(source) if source is not None else Path(record.input_file).name,
            input_ids=input_ids,
            trainable=trainable,
            n_tokens=len(input_ids),
            n_trainable=n_trainable,
            n_turns=count_turns(trainable),
            truncated=truncated,
        ))


def _batched(rows: Iterator[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _up_to_date(output: Path, identity: dict[str, Any]) -> bool:
    """True when `output` already holds a complete, valid corpus made from the same inputs and settings."""
    if not (output / MANIFEST).is_file():
        return False
    try:
        manifest = read_manifest(output, kind="tokenized")
        verify_shards(output, manifest)
    except (ArtifactError, ValueError):
        return False
    return manifest.get("run_identity") == sha256_json(identity)


def _clear_previous(output: Path, overwrite: bool) -> None:
    """Remove an earlier prepare's files: always when it never finished, else only with --overwrite."""
    finished = (output / MANIFEST).is_file()
    if finished and not overwrite:
        raise PrepareError(
            f"{output} already holds a prepared corpus made from other inputs or settings; "
            "pass --overwrite to replace it or choose another --output"
        )
    for old in [*output.glob("part-*.parquet"), output / REJECTED, output / MANIFEST]:
        old.unlink(missing_ok=True)


def run_prepare(config: PrepareConfig) -> PrepareSummary:
    """Run the prepare stage; see the module docstring. Raises `PrepareError` if no row is valid."""
    started = time.monotonic()
    sources = resolve_inputs(config.input)
    tokenizer = load_chat_tokenizer(config)
    fingerprints = tokenizer_fingerprints(tokenizer)
    input_fingerprint = files_fingerprint([f for s in sources for f in s.files()])
    settings = config.resolved()
    identity = {k: v for k, v in settings.items() if k not in ("output", "overwrite", "input")}
    identity |= {"input_fingerprint": input_fingerprint, "tokenizer": fingerprints}
    output = Path(config.output)
    summary = PrepareSummary(output=output)

    with exclusive_output(output):
        remove_stale_temporaries(output)
        if _up_to_date(output, identity):
            manifest = read_manifest(output)
            counts = manifest["counts"]
            summary.rows_read, summary.rows_written = counts["rows_read"], counts["rows_written"]
            summary.rows_rejected, summary.shards = counts["rows_rejected"], len(manifest["shards"])
            summary.rejected_by_reason.update(manifest.get("rejected_by_reason", {}))
            summary.tokens, summary.trainable_tokens = counts["tokens"], counts["trainable_tokens"]
            summary.reused = True
            return summary
        _clear_previous(output, config.overwrite)

        builder = _SampleBuilder(config, ChatRenderer(tokenizer), use_ids=_ids_are_unique(sources))
        rejected: list[dict[str, Any]] = []
        inputs: list[dict[str, Any]] = []

        def samples() -> Iterator[dict[str, Any]]:
            for source in sources:
                read = written = 0
                for record in iter_records(source):
                    read += 1
                    sample = builder.build(record)
                    if sample.row is None:
                        rejected.append(sample.rejection)
                        summary.rejected_by_reason[sample.rejection["reason"]] += 1
                        continue
                    written += 1
                    summary.tokens += sample.row["n_tokens"]
                    summary.trainable_tokens += sample.row["n_trainable"]
                    yield sample.row
                summary.rows_read += read
                inputs.append({"path": str(source.path), "format": source.format, "rows_read": read,
                               "rows_written": written, "rows_rejected": read - written})
                if written == 0:
                    summary.inputs_without_rows.append(f"{source.path} ({'empty' if read == 0 else 'no valid row'})")

        shards = []
        for index, rows in enumerate(_batched(samples(), config.rows_per_shard)):
            name = shard_name(index)
            digest = write_parquet_atomic(table_from_rows(rows, "tokenized"), output / name)
            shards.append({"file": name, "rows": len(rows), "sha256": digest})
            summary.rows_written += len(rows)
        summary.rows_rejected = len(rejected)
        summary.shards = len(shards)
        if summary.rows_read != summary.rows_written + summary.rows_rejected:
            raise PrepareError(
                f"accounting mismatch: {summary.rows_read} read != {summary.rows_written} written"
                f" + {summary.rows_rejected} rejected; this is a bug, please report it"
            )
        rejected_digest = write_parquet_atomic(table_from_rows(rejected, "rejected"), output / REJECTED)
        if summary.rows_written == 0:
            raise PrepareError(
                f"no valid row in {', '.join(str(s.path) for s in sources) or 'the inputs'} "
                f"({summary.rows_read} read, all rejected: {dict(summary.rejected_by_reason)}); see {output / REJECTED}"
            )

        manifest = base_manifest("tokenized", settings) | {
            "run_identity": sha256_json(identity),
            "tokenizer": {
                "name_or_path": config.tokenizer,
                "fingerprint": fingerprints["tokenizer"],
                "chat_template_fingerprint": fingerprints["chat_template"],
            },
            "input_fingerprint": input_fingerprint,
            "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in shards]),
            "inputs": inputs,
            "id_policy": "id column" if builder.use_ids else "content hash",
            "shards": shards,
            "rejected": {"file": REJECTED, "rows": len(rejected), "sha256": rejected_digest},
            "rejected_by_reason": dict(summary.rejected_by_reason),
            "counts": {
                "rows_read": summary.rows_read,
                "rows_written": summary.rows_written,
                "rows_rejected": summary.rows_rejected,
                "duplicates": summary.rejected_by_reason.get("duplicate", 0),
                "tokens": summary.tokens,
                "trainable_tokens": summary.trainable_tokens,
            },
            "timings": {"seconds": round(time.monotonic() - started, 3)},
        }
        write_manifest(output, manifest)
    return summary
