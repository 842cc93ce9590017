"""A selection over a scores folder: per-shard work (plain functions Ray can run) and the driver.

Both stages that select call `plan_selection`, then `apply_selection`: the score stage at its
end, over the shards it just wrote, and the select stage over an existing scores folder. One code path, so re-selecting
gives the bytes a fresh scoring at those settings gives, and no model runs.

The selection goes to one of two places, by the same code: in place (each score shard is rewritten,
keeps its progress record, its run key, and the record gains the `selection` it now holds), or
apart (`select --output`: a mask shard of the same name in another folder, `masks.v1`, whose
record names the score shard it was selected from). A shard whose record already carries this
selection (and, apart, the same score shard), with the file still at the recorded checksum, is
left alone, so a rerun after a kill redoes only the shards still to write. This module imports no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.runtime.errors import UserError
from pipeline.runtime.files import read_shard
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.mask_weights import with_weight
from pipeline.runtime.schemas import present_schema
from pipeline.runtime.stage_output import commit_shard, read_record
from pipeline.selection import global_selection
from pipeline.selection.global_selection import ParallelMap, serial_map
from pipeline.selection.keep_tables import CorpusSelection, selected_table, shard_rel_stats
from pipeline.selection.methods import RelStats, rel_guard, same_checkpoint_refusal
from pipeline.selection.sample_filter import find_sample_filter, refuse_rel_rollup_over_one_checkpoint
from pipeline.selection.select_settings import SelectSettings


SAME_CHECKPOINT_NOTE = (
    "current and history are the same checkpoint (round 0): REL is 0 at every target, so attention alone decides"
)


@dataclass(frozen=True)
class SelectShard:
    """One score shard, the tokenized shard that gives its trainable mask, and where its selection goes:
    `output_folder` None rewrites the score shard in place; a folder gets a mask shard of the same name."""

    file: str
    folder: str  # the scores folder
    tokenized_path: str
    output_folder: str | None = None
    scores_sha256: str | None = None  # apart: the score shard's checksum in the scores manifest

    @property
    def path(self) -> Path:
        return Path(self.folder) / self.file

    @property
    def target_folder(self) -> Path:
        """The folder the selected shard is committed to."""
        return Path(self.output_folder if self.output_folder is not None else self.folder)


def selection_record(settings: SelectSettings, rel_is_noise: bool = False) -> dict[str, Any]:
    """The `selection` a shard's record carries for a per-sample selection (the score stage writes
    this one with each shard; the select step compares against it)."""
    key = settings.selection_key()
    return key | {"rel_is_noise": rel_is_noise} if settings.uses_rel else key


def _joined(shard: SelectShard) -> tuple[Any, Any]:
    """The shard's scores (canonical schema, so a rewrite is byte-identical to a fresh write; a shard written before
    an optional column existed keeps its columns) and its trainable column."""
    scores = read_shard(shard.path, "scores")
    scores = scores.cast(present_schema("scores", scores.column_names))
    tokenized = pq.read_table(shard.tokenized_path, columns=["sample_id", "trainable"])
    if not scores.column("sample_id").equals(tokenized.column("sample_id")):
        raise UserError(f"{shard.path} and {shard.tokenized_path} list different samples; rerun `sstoken score`")
    return scores, tokenized.column("trainable")


def rel_stats_of_shard(shard: SelectShard) -> RelStats:
    """Pass 0 (methods that use REL): the shard's target count and largest |REL|."""
    scores, trainable = _joined(shard)
    return shard_rel_stats(scores, trainable)


def mask_table(selected: pa.Table) -> pa.Table:
    """The masks.v1 columns of a selected scores table (the signals stay in the scores folder), with its weight
    (keep as 0/1 when the selection gave none)."""
    schema = present_schema("masks", selected.column_names + ["weight"])  # no step: that is online masks' column
    return with_weight(selected).select(schema.names).cast(schema)


def _source_record(shard: SelectShard, existing: dict[str, Any] | None) -> dict[str, Any]:
    """What the committed record carries besides the selection: in place, the score shard's own record
    (its run key); apart, the score shard the mask shard is selected from."""
    if shard.output_folder is not None:
        return {"scores_file": shard.file, "scores_sha256": shard.scores_sha256}
    if existing is None:
        raise UserError(
            f"{shard.path} has no progress record (_progress/{shard.file}.json): it was not written by `sstoken score` "
            "or the record was lost, so it cannot be re-selected in place; select into another folder with --output "
            "(which only reads the scores), or rerun `sstoken score` for this folder"
        )
    return existing


def refuse_unrecorded_shards(shards: Sequence[SelectShard]) -> None:
    """In place, every score shard must have its progress record (its run key goes into the rewritten one):
    refuse the folder, naming the first shard without one, before anything in it is touched."""
    for shard in shards:
        if shard.output_folder is None and read_record(shard.target_folder, shard.file) is None:
            _source_record(shard, None)  # raises, naming the shard and what to do


def rewrite_selection(
    shard: SelectShard, record_selection: dict[str, Any], selection: CorpusSelection, threshold: int | None = None,
    ties: int = 0,
) -> dict[str, Any]:
    """One shard's score, keep and n_kept from its stored signals, committed with its record (in place,
    or as a mask shard apart); skipped when the record already carries `record_selection` and its
    source, and the file its recorded checksum. A global selection passes the threshold key and the
    shard's tie quota."""
    target = shard.target_folder
    existing = read_record(target, shard.file)
    source = _source_record(shard, existing)
    if (
        existing is not None
        and all(existing.get(name) == value for name, value in source.items())
        and existing.get("selection") == record_selection
        and sha256_file(target / shard.file) == existing.get("sha256")
    ):
        return existing
    scores, trainable = _joined(shard)
    if shard.output_folder is not None:
        scores = with_weight(scores)  # the selection's weights go to the mask shard (older scores have no column)
    if selection.settings.granularity == "global":
        table = global_selection.apply_threshold(scores, trainable, selection, threshold, ties)
    else:
        table = selected_table(scores, trainable, selection)
    if shard.output_folder is not None:
        table = mask_table(table)
    update = {"selection": record_selection, "kept": int(pc.sum(table.column("n_kept")).as_py() or 0)}
    return commit_shard(target, shard.file, table, source | update)


@dataclass(frozen=True)
class SelectionPlan:
    """A selection checked against the corpus, before anything is written."""

    selection: CorpusSelection
    record: dict[str, Any]  # the `selection` every shard's record will carry (global: plus k, threshold, ties)
    warnings: list[str] = field(default_factory=list)
    samples: dict[str, Any] | None = None  # with a sample filter: what it keeps and drops (sample_rollups.filter_summary)


@dataclass
class SelectionOutcome:
    """What a selection did: the manifest's `selection` section, each shard's record, how many were rewritten."""

    selection: dict[str, Any]
    records: list[dict[str, Any]]
    rewritten: int
    warnings: list[str] = field(default_factory=list)


# Manifest counts of a sample filter (a selection without one leaves them out).
SAMPLE_COUNTS = ("samples_kept", "samples_dropped", "targets_dropped")


def sample_counts(selection: dict[str, Any]) -> dict[str, int]:
    """What a selection section's sample filter kept and dropped, as counts (none without a filter)."""
    samples = selection.get("samples")
    if samples is None:
        return {}
    return {"samples_kept": samples["kept"], "samples_dropped": samples["dropped"],
            "targets_dropped": samples["dropped_targets"]}


def refuse_missing_column(shards: Sequence[SelectShard], settings: SelectSettings) -> None:
    """Refuse, naming the column and the first shard, a method whose ranked column, or a sample filter whose averaged
    column, a shard lacks (entropy over scores written before entropy_cur was stored)."""
    needs = {settings.ranked_signal: f"method {settings.method} ranks",
             settings.sample_rollup_column: f"sample_by {settings.sample_by} averages"}
    needs.pop(None, None)
    for shard in shards:
        try:
            names = pq.read_schema(shard.path).names
        except (pa.ArrowException, OSError):
            continue  # an unreadable shard is refused by name where it is read
        for column, what in needs.items():
            if column not in names:
                raise UserError(
                    f"{what} {column}, which {shard.path} lacks: its scores were written before sstoken stored "
                    f"{column}; rescore the corpus with `sstoken score` (it stores {column} by default), then select"
                )


def refuse_unweighted_in_place(shards: Sequence[SelectShard], settings: SelectSettings) -> None:
    """Refuse, naming the first shard, a weighted method in place over score shards without a `weight` column
    (written before sstoken stored weights): the weights would have nowhere to go."""
    if not settings.weighted:
        return
    for shard in shards:
        if shard.output_folder is not None:
            continue
        try:
            names = pq.read_schema(shard.path).names
        except (pa.ArrowException, OSError):
            continue  # an unreadable shard is refused by name where it is read
        if "weight" not in names:
            raise UserError(
                f"method {settings.method} weights each kept token, but {shard.path} has no 'weight' column (its scores "
                "were written before sstoken stored weights); select into a masks folder with --output, or rescore with "
                "`sstoken score` (a rerun rescores such shards)"
            )


def refuse_unknown_vocab_size(settings: SelectSettings, vocab_size: int | None) -> None:
    """entropy-gated divides the entropy by ln|V|: refuse it when the scores do not record |V| (or it is below 2)."""
    if settings.method == "entropy-gated" and (vocab_size is None or vocab_size < 2):
        raise UserError(
            "method entropy-gated divides entropy_cur by ln|V|, but the scores' manifest records no vocabulary size "
            "(signals.vocab_size: scores written before sstoken recorded it); rescore the corpus with `sstoken score`"
        )


def plan_selection(
    shards: Sequence[SelectShard],
    settings: SelectSettings,
    *,
    same_checkpoint: bool,
    parallel_map: ParallelMap = serial_map,
    vocab_size: int | None = None,
) -> SelectionPlan:
    """Check a selection against the corpus; every refusal happens here, before any shard is rewritten.

    Refuses a REL-only method over one checkpoint, REL missing at targets, and a REL-only method
    whose REL is below the floor everywhere; for other methods REL below the floor counts as 0 and
    the plan carries a warning; refuses a method whose ranked column the shards lack, a weighted method in place
    over shards without a weight column, and entropy-gated without the vocabulary size `vocab_size` (|V|). With a
    sample filter, finds its corpus-wide cut (one more pass over the shards).
    """
    refuse_missing_column(shards, settings)
    refuse_unweighted_in_place(shards, settings)
    refuse_unknown_vocab_size(settings, vocab_size)
    warnings: list[str] = []
    noise = False
    if same_checkpoint:
        refuse_rel_rollup_over_one_checkpoint(settings)
    if same_checkpoint and settings.uses_rel:
        same_checkpoint_refusal(settings)
        # REL is 0 by construction (nll_hist is nll_cur), not noise of two near-identical checkpoints.
        warnings = [SAME_CHECKPOINT_NOTE]
    elif settings.uses_rel:
        stats = RelStats()
        for shard_stats in parallel_map(rel_stats_of_shard, [(s,) for s in shards]):
            stats = stats.merge(shard_stats)
        warnings = rel_guard(settings, stats)
        noise = stats.is_noise
    selection = CorpusSelection(settings, rel_is_noise=noise, vocab_size=vocab_size)
    record = selection_record(settings, noise)
    if not settings.filters_samples:
        return SelectionPlan(selection, record, warnings)
    found = find_sample_filter([(s.path, Path(s.tokenized_path)) for s in shards], selection, parallel_map)
    cut = found.cut.as_dict() if found.cut is not None else None
    return SelectionPlan(replace(selection, sample_cut=found.cut), record | {"sample_cut": cut}, warnings, found.summary)


def apply_selection(
    shards: Sequence[SelectShard], plan: SelectionPlan, parallel_map: ParallelMap = serial_map
) -> SelectionOutcome:
    """Write every shard whose record does not carry the plan's selection (the caller holds the lock of
    the folder written to)."""
    before = [(read_record(s.target_folder, s.file) or {}).get("sha256") for s in shards]
    common = plan.record
    if plan.selection.settings.granularity == "global":
        targets = plan.samples["kept_targets"] if plan.samples is not None else None
        records, common = _select_globally(shards, plan.selection, common, parallel_map, targets)
    else:
        records = list(parallel_map(rewrite_selection, [(s, common, plan.selection) for s in shards]))
    rewritten = sum(b != r["sha256"] for b, r in zip(before, records))
    section = (common | ({"warnings": plan.warnings} if plan.warnings else {})
               | ({"samples": plan.samples} if plan.samples is not None else {}))
    return SelectionOutcome(selection=section, records=records, rewritten=rewritten, warnings=plan.warnings)


def _select_globally(
    shards: Sequence[SelectShard], selection: CorpusSelection, common: dict[str, Any], parallel_map: ParallelMap,
    targets: int | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Exact corpus-wide top-k: three histogram/count passes, then one rewrite per shard. `targets`: the candidates
    (the targets of the samples a sample filter keeps); default every target of the corpus."""
    pairs = [(s.path, Path(s.tokenized_path)) for s in shards]
    if targets is None:
        targets = sum(int(pc.sum(pq.read_table(s.tokenized_path, columns=["n_trainable"]).column(0)).as_py() or 0)
                      for s in shards)
    k = global_selection.selection_size(selection, targets)
    threshold, quotas = global_selection.find_threshold(pairs, selection, k, parallel_map=parallel_map)
    common = common | {"k": k, "threshold": threshold.as_dict() if threshold else None}
    key = threshold.key if threshold else None
    rewrites = [(s, common | {"ties": q}, selection, key, q) for s, q in zip(shards, quotas)]
    return list(parallel_map(rewrite_selection, rewrites)), common
