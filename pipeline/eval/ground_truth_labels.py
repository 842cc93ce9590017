"""Which tokens of a tokenized ground-truth corpus are corrupted, aligned with its shards.

The task records corrupted character spans inside assistant contents (`eval.ground_truth`);
scores and masks are per token. Each sample is rendered again with the tokenized folder's own
tokenizer and chat template (`ChatRenderer.render_marking`, the same code prepare ran), the
rendering is checked against the stored tokens, and a token counts as corrupted when it is
trainable and overlaps a corrupted span. The result follows the alignment contract: one flag per
token (`len == n_tokens`), false on every context token and on position 0, truncation included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from pipeline.data.chat import ChatRenderer, TemplateError, load_chat_template
from pipeline.data.conversation import RowError, normalise_messages
from pipeline.eval.ground_truth import read_jsonl
from pipeline.runtime.checkpoints import load_tokenizer
from pipeline.runtime.files import ArtifactError, read_manifest, read_shard, verify_shards
from pipeline.runtime.fingerprint import tokenizer_fingerprints

LABEL_SCHEMA = {"sample_id": pl.String, "corrupted": pl.List(pl.Boolean)}


def _spans(row: dict[str, Any], where: str) -> list[tuple[int, int, int]]:
    spans = row.get("corruption", [])
    if not isinstance(spans, list):
        raise ArtifactError(f"{where}: 'corruption' is {type(spans).__name__}, expected a list of spans")
    out = []
    for index, span in enumerate(spans):
        try:
            values = (span["turn"], span["start"], span["end"])
        except (TypeError, KeyError) as error:
            raise ArtifactError(f"{where}: corruption span {index} needs 'turn', 'start' and 'end'") from error
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ArtifactError(f"{where}: corruption span {index} has non-integer turn/start/end {list(values)}")
        out.append(values)
    return out


def corrupted_flags(renderer: ChatRenderer, row: dict[str, Any], input_ids: list[int], trainable: list[bool]) -> list[bool]:
    """One flag per stored token of the sample made from `row`: trainable and inside a corrupted span.

    Raises `ArtifactError` when the row does not render to the stored tokens (another row, tokenizer
    or template made them); a truncated sample's tokens are a prefix of the rendering.
    """
    where = f"task row {row.get('id')!r}"
    try:
        messages = normalise_messages(row)
        rendered, marked = renderer.render_marking(messages, _spans(row, where))
    except (RowError, TemplateError) as error:
        raise ArtifactError(f"{where}: {error}") from error
    n = len(input_ids)
    if rendered.input_ids[:n] != list(input_ids) or rendered.trainable[:n] != list(trainable) or n == 0:
        raise ArtifactError(
            f"{where} does not render to the stored tokens of its sample ({n} stored, {len(rendered.input_ids)} "
            "rendered); the tokenized folder was made from other rows or with another tokenizer or template"
        )
    return marked[:n]


def _renderer_of(tokenized: Path, manifest: dict[str, Any], tokenizer: Any) -> ChatRenderer:
    """The renderer prepare used: the folder's tokenizer (or the one given) with the same template and BOS rule."""
    config = manifest["config"]
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        folder = tokenizer if tokenizer is not None else config["tokenizer"]
        tokenizer = load_tokenizer(folder, trust_remote_code=bool(config.get("trust_remote_code", False)))
        template = config.get("chat_template")
        load_chat_template(tokenizer, Path(template) if template else None, str(folder))
    fingerprints = tokenizer_fingerprints(tokenizer)
    recorded = manifest["tokenizer"]
    if (fingerprints["tokenizer"], fingerprints["chat_template"]) != (
        recorded["fingerprint"], recorded["chat_template_fingerprint"]
    ):
        raise ArtifactError(
            f"the tokenizer or chat template differs from the one that made {tokenized} "
            f"(recorded {recorded['name_or_path']}); pass the tokenizer folder prepare used"
        )
    return ChatRenderer(tokenizer, add_bos=bool(config.get("add_bos", False)))


def corrupted_token_mask(tokenized: Path, train_jsonl: Path, tokenizer: Any = None) -> pl.DataFrame:
    """[sample_id, corrupted: list<bool>] for every sample of the tokenized folder, in shard order.

    `tokenizer` (a folder or a loaded tokenizer) defaults to the one the folder's manifest names.
    Every tokenized sample must come from a row of `train_jsonl` with that id (prepare uses the
    rows' unique ids as sample ids); task rows prepare rejected are simply absent.
    """
    tokenized, train_jsonl = Path(tokenized), Path(train_jsonl)
    manifest = read_manifest(tokenized, "tokenized")
    verify_shards(tokenized, manifest)
    rows: dict[str, dict[str, Any]] = {}
    for row in read_jsonl(train_jsonl):
        if str(row.get("id")) in rows:
            raise ArtifactError(f"{train_jsonl} holds id {row.get('id')!r} twice; task ids must be unique")
        rows[str(row.get("id"))] = row
    renderer = _renderer_of(tokenized, manifest, tokenizer)
    sample_ids, flags = [], []
    for entry in manifest["shards"]:
        shard = read_shard(tokenized / entry["file"], "tokenized", columns=["sample_id", "input_ids", "trainable"])
        for sample_id, input_ids, trainable in zip(*(shard.column(c).to_pylist() for c in shard.column_names)):
            row = rows.get(sample_id)
            if row is None:
                raise ArtifactError(
                    f"sample {sample_id!r} of {tokenized} has no row in {train_jsonl}; prepare that file "
                    "(its ids become the sample ids) and label the folder it made"
                )
            sample_ids.append(sample_id)
            flags.append(corrupted_flags(renderer, row, input_ids, trainable))
    return pl.DataFrame({"sample_id": sample_ids, "corrupted": flags}, schema=LABEL_SCHEMA)
