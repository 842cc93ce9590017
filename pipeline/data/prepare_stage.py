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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.chat import ChatRenderer, TemplateError, count_turns, load_chat_template
from pipeline.data.conversation import RowError, content_id, normalise_messages, row_id
from pipeline.data.corpus import InputRecord, InputSource, iter_records, resolve_inputs
from pipeline.data.prepare_config import PrepareConfig
from pipeline.runtime.checkpoints import load_tokenizer
from pipeline.runtime.errors import UserError
from pipeline.runtime.files import REJECTED, base_manifest, code_version, shard_name
from pipeline.runtime.fingerprint import files_fingerprint, sha256_json, tokenizer_fingerprints
from pipeline.runtime.schemas import table_from_rows
from pipeline.runtime.stage_output import StageOutput, StageSummary
from pipeline.runtime.stage_runner import Stage, local_inputs, run_stage

logger = logging.getLogger(__name__)


def load_chat_tokenizer(config: PrepareConfig) -> Any:
    """The tokenizer folder's tokenizer, with a usable chat template installed."""
    tokenizer = load_tokenizer(config.tokenizer, trust_remote_code=config.trust_remote_code)
    load_chat_template(tokenizer, config.chat_template, config.tokenizer)
    ChatRenderer(tokenizer, add_bos=config.add_bos)  # refuses add_bos without a BOS token, before any output is touched
    return tokenizer


def _ids_are_unique(sources: list[InputSource], max_row_bytes: int) -> bool:
    """First pass: use the input's `id` column only if every id it holds is distinct."""
    seen: set[str] = set()
    for source in sources:
        for record in iter_records(source, max_row_bytes):
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


def run_prepare(config: PrepareConfig) -> StageSummary:
    """Run the prepare stage; see the module docstring. Raises `UserError` if no row is valid."""
    started = time.monotonic()
    sources = resolve_inputs(config.input)
    tokenizer = load_chat_tokenizer(config)
    fingerprints = tokenizer_fingerprints(tokenizer)
    input_fingerprint = files_fingerprint([f for s in sources for f in s.files()])
    identity = config.run_key_settings() | {"input_fingerprint": input_fingerprint, "tokenizer": fingerprints}
    output = Path(config.output)
    # Shards are reused on a resume only when inputs, settings and code are all unchanged.
    run_key = sha256_json(identity | {"code_version": code_version()})

    def work(out: StageOutput, _: None) -> dict[str, Any]:
        manifest = _write_corpus(config, sources, tokenizer, out, run_key)
        return base_manifest("tokenized", config.resolved()) | {
            "tokenizer": {
                "name_or_path": config.tokenizer,
                "fingerprint": fingerprints["tokenizer"],
                "chat_template_fingerprint": fingerprints["chat_template"],
            },
            "input_fingerprint": input_fingerprint,
            "data_fingerprint": sha256_json([[s["file"], s["sha256"]] for s in manifest["shards"]]),
        } | manifest | {"timings": {"seconds": round(time.monotonic() - started, 3)}}

    inputs = [*config.input, *local_inputs(config.tokenizer, config.chat_template)]
    run = run_stage(Stage("tokenized", output, identity, inputs, config.overwrite), work)
    return _summary(run.manifest, output, started, reused=run.reused)


def _write_corpus(
    config: PrepareConfig, sources: list[InputSource], tokenizer: Any, out: StageOutput, run_key: str
) -> dict[str, Any]:
    """Build every sample, commit the shards and rejected.parquet; the manifest fields they give."""
    renderer = ChatRenderer(tokenizer, add_bos=config.add_bos)
    builder = _SampleBuilder(config, renderer, use_ids=_ids_are_unique(sources, config.max_row_bytes))
    rejected: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    tally: Counter = Counter()
    by_reason: Counter = Counter()

    def samples() -> Iterator[dict[str, Any]]:
        for source in sources:
            read = written = 0
            for record in iter_records(source, config.max_row_bytes):
                read += 1
                sample = builder.build(record)
                if sample.row is None:
                    rejected.append(sample.rejection)
                    by_reason[sample.rejection["reason"]] += 1
                    continue
                written += 1
                tally["tokens"] += sample.row["n_tokens"]
                tally["trainable_tokens"] += sample.row["n_trainable"]
                yield sample.row
            tally["rows_read"] += read
            inputs.append({"path": str(source.path), "format": source.format, "rows_read": read,
                           "rows_written": written, "rows_rejected": read - written})

    def commit(name: str, rows: list[dict[str, Any]], schema: str) -> dict[str, Any]:
        key = sha256_json([run_key, name])
        record = out.done(name, key) or out.commit(name, table_from_rows(rows, schema), {"run_key": key})
        return {"file": name, "rows": record["rows"], "sha256": record["sha256"]}

    shards = [commit(shard_name(i), rows, "tokenized") for i, rows in enumerate(_batched(samples(), config.rows_per_shard))]
    written = sum(s["rows"] for s in shards)
    if tally["rows_read"] != written + len(rejected):
        raise RuntimeError(  # a bug, not the user's: it keeps its traceback
            f"accounting mismatch: {tally['rows_read']} read != {written} written"
            f" + {len(rejected)} rejected; this is a bug, please report it"
        )
    rejected_entry = commit(REJECTED, rejected, "rejected")
    if written == 0:
        raise UserError(
            f"no valid row in {', '.join(str(s.path) for s in sources) or 'the inputs'} "
            f"({tally['rows_read']} read, all rejected: {dict(by_reason)}); see {out.folder / REJECTED}"
        )
    return {
        "inputs": inputs,
        "id_policy": "id column" if builder.use_ids else "content hash",
        "shards": shards,
        "rejected": rejected_entry,
        "rejected_by_reason": dict(by_reason),
        "counts": {
            "rows_read": tally["rows_read"],
            "rows_written": written,
            "rows_rejected": len(rejected),
            "duplicates": by_reason.get("duplicate", 0),
            "tokens": tally["tokens"],
            "trainable_tokens": tally["trainable_tokens"],
        },
    }


def _summary(manifest: dict[str, Any], output: Path, started: float, reused: bool) -> StageSummary:
    """The run's summary, from the manifest it wrote or found complete (so both read the same)."""
    without_rows = [
        f"{entry['path']} ({'empty' if entry['rows_read'] == 0 else 'no valid row'})"
        for entry in manifest.get("inputs", [])
        if entry["rows_written"] == 0
    ]
    return StageSummary(
        stage="prepare",
        output=output,
        counts=dict(manifest["counts"]) | {"shards": len(manifest["shards"])},
        timings={"seconds": round(time.monotonic() - started, 3)},
        notes=[f"input gave no valid row: {entry}" for entry in without_rows],
        details={"rejected_by_reason": dict(manifest.get("rejected_by_reason", {})), "inputs_without_rows": without_rows},
        reused=reused,
    )
