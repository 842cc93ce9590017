"""Score tables with their `score`, `keep` and `n_kept` columns (re)computed from the stored signals.

No model runs here. `selected_table` applies a selection method (`pipeline.selection.methods`) to
one scores.v1 table: per sample it also picks the keep mask; for `--granularity global` the
mask comes from `pipeline.selection.global_selection`, which ranks `CorpusSelection.shard_candidates`.
Every other column (the signals nll_cur, nll_hist, rel, attn, entropy_cur) is left untouched.

Weights: a binary method's weight is keep as float32 (`runtime.mask_weights.flat_weights`). A weighted method
(prob, entropy-gated) ranks its weight: `selected_table` takes the weights from the scores
(`methods.selection_weight`: the score at the kept tokens, 0 elsewhere) and passes them to
`with_selection(..., weight=...)`, which checks them and stores them in the table's `weight` column. A scores
table has that column when the scorer wrote it (`signals_table`); a selection apart (`select --output`) selects
over the scores with a `weight` column added (`runtime.mask_weights.with_weight`), so
`selection_shards.mask_table` writes it into masks.v1. A scores table written before the column existed has
none: `with_selection` refuses a weight for it rather than drop it (and `selection_shards.plan_selection` refuses
such a folder in place by name before anything is written).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.runtime.alignment import WEIGHT, weight_flags
from pipeline.runtime.errors import UserError
from pipeline.runtime.mask_weights import flat_weights
from pipeline.selection.methods import RelStats, nan_at_targets, sample_keep, sample_score, selection_weight
from pipeline.selection.sample_rollups import SampleCut, rollup_means, stays
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.token_labels import read_token_labels, sample_drop


def flat_values(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """The values of a list column, all rows concatenated."""
    return pc.list_flatten(column).to_numpy(zero_copy_only=False)


def row_arrays(column: pa.ChunkedArray | pa.Array, dtype: type | np.dtype) -> list[np.ndarray]:
    """Split a list<...> column into one numpy array per row."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _list_lengths(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return pc.list_value_length(column).to_numpy(zero_copy_only=False)


def _check_joined(scores: pa.Table, trainable: pa.ChunkedArray) -> None:
    if _list_lengths(trainable).tolist() != _list_lengths(scores.column("rel")).tolist():
        raise ValueError("score and trainable lists differ in length; they belong to different data")


@dataclass(frozen=True)
class CorpusSelection:
    """A selection method resolved for one corpus: its settings, whether REL was found to be noise, the
    vocabulary size |V| of the model that scored it (entropy-gated's ln|V|; None: not known) and, with a sample
    filter, the cut the corpus gave (`pipeline.selection.sample_rollups`)."""

    settings: SelectSettings
    rel_is_noise: bool = False
    vocab_size: int | None = None
    sample_cut: SampleCut | None = None

    @property
    def columns(self) -> list[str]:
        """The score-shard columns the method's score and the sample filter's roll-up are computed from (what the
        global passes read)."""
        extra = (self.settings.ranked_signal, self.settings.sample_rollup_column)
        return ["sample_id", "rel", "attn", *dict.fromkeys(name for name in extra if name and name not in ("rel", "attn"))]

    def sample_scores(self, scores: pa.Table, trainable: pa.ChunkedArray) -> list[np.ndarray]:
        """Each row's score (full length, NaN off the targets) from the table's signal columns."""
        _check_joined(scores, trainable)
        ids = scores.column("sample_id").to_pylist()
        rel, attn = row_arrays(scores.column("rel"), np.float32), row_arrays(scores.column("attn"), np.float32)
        # loss, confidence and entropy rank nll_cur and entropy_cur; for the others the NLLs only say why a needed
        # signal is NaN, and a reader of rel and attn alone (global passes) goes without.
        nll_cur, nll_hist, entropy_cur = (
            row_arrays(scores.column(name), np.float32) if name in scores.column_names else [None] * len(ids)
            for name in ("nll_cur", "nll_hist", "entropy_cur")
        )
        masks = row_arrays(trainable, bool)
        drops: list[np.ndarray | None] = [None] * len(ids)
        if self.settings.labels is not None:
            labels = read_token_labels(self.settings.labels)
            drops = [sample_drop(labels, ids[row], masks[row], self.settings.labels) for row in range(len(ids))]
        return [
            sample_score(ids[row], rel[row], attn[row], masks[row], self.settings, self.rel_is_noise, drops[row],
                         nll_cur=nll_cur[row], nll_hist=nll_hist[row], entropy_cur=entropy_cur[row],
                         vocab_size=self.vocab_size)
            for row in range(len(ids))
        ]

    def sample_rollups(self, scores: pa.Table, trainable: pa.ChunkedArray,
                       rows: list[np.ndarray] | None = None) -> np.ndarray:
        """Each row's roll-up for the sample filter: the mean over its targets of the method's score (`rows`, computed
        when not given) or of the stored column `sample_by` names, which must be there at every target."""
        column = self.settings.sample_rollup_column
        masks = row_arrays(trainable, bool)
        if column is None:
            return rollup_means(rows if rows is not None else self.sample_scores(scores, trainable), masks)
        values = row_arrays(scores.column(column), np.float32)
        for row, (value, mask) in enumerate(zip(values, masks)):
            if np.isnan(value[mask]).any():
                found = nan_at_targets(column, scores.column("sample_id")[row].as_py(), value, mask)
                raise UserError(f"sample_by {self.settings.sample_by} averages {column} over every target: {found}")
        return rollup_means(values, masks)

    def sample_stays(self, scores: pa.Table, trainable: pa.ChunkedArray,
                     rows: list[np.ndarray] | None = None) -> np.ndarray:
        """Which rows the sample filter keeps (every row without one)."""
        if self.sample_cut is None:
            return np.ones(scores.num_rows, dtype=bool)
        return stays(self.sample_rollups(scores, trainable, rows), scores.column("sample_id").to_pylist(), self.sample_cut)

    def shard_candidates(self, scores: pa.Table, trainable: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
        """(every token's score, the tokens a selection may keep: the targets of the samples the filter keeps),
        rows concatenated: what the global selection ranks."""
        rows = self.sample_scores(scores, trainable)
        score = np.concatenate(rows) if rows else np.zeros(0, np.float32)
        lengths = [len(row) for row in rows]
        kept_rows = np.repeat(self.sample_stays(scores, trainable, rows), lengths)
        return score, flat_values(trainable).astype(bool) & kept_rows


def shard_rel_stats(scores: pa.Table, trainable: pa.ChunkedArray) -> RelStats:
    """REL statistics over one table's targets (merged across shards for the corpus-wide guard), with what is NaN
    where in the first sample missing REL at a target."""
    _check_joined(scores, trainable)
    rel, targets = flat_values(scores.column("rel")), flat_values(trainable).astype(bool)
    first_missing = ""
    if np.isnan(rel[targets]).any():
        masks, rels = row_arrays(trainable, bool), row_arrays(scores.column("rel"), np.float32)
        row = next(r for r in range(len(masks)) if np.isnan(rels[r][masks[r]]).any())
        nll_cur, nll_hist = (row_arrays(scores.column(name), np.float32)[row] if name in scores.column_names else None
                             for name in ("nll_cur", "nll_hist"))
        first_missing = nan_at_targets("rel", scores.column("sample_id")[row].as_py(), rels[row], masks[row],
                                       nll_cur, nll_hist)
    return RelStats.of(rel, targets, first_missing)


def with_selection(scores: pa.Table, score: np.ndarray, keep: np.ndarray, weight: np.ndarray | None = None) -> pa.Table:
    """`scores` with `score` and `keep` set from flat arrays (one entry per token, rows in order), `n_kept` recounted;
    and its `weight` column, when it has one, from `weight` (a weighted method's) or keep as 0/1."""
    lengths = _list_lengths(scores.column("keep"))
    for name, values in (("score", score), ("keep", keep), ("weight", keep if weight is None else weight)):
        if len(values) != int(lengths.sum()):
            raise ValueError(f"{name} has {len(values)} entries for {int(lengths.sum())} tokens")
    if weight is not None:
        _refuse_bad_weight(scores, weight, keep)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), pa.int32())
    rows = np.repeat(np.arange(len(lengths)), lengths)
    n_kept = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int32)
    schema = scores.schema
    columns = {
        "score": pa.ListArray.from_arrays(offsets, pa.array(score, pa.float32())),
        "keep": pa.ListArray.from_arrays(offsets, pa.array(keep, pa.bool_())),
        "n_kept": pa.array(n_kept, pa.int32()),
    }
    if WEIGHT in schema.names:
        columns[WEIGHT] = pa.ListArray.from_arrays(offsets, pa.array(flat_weights(keep, weight), pa.float32()))
    table = scores
    for name, column in columns.items():
        field = schema.field(name)
        table = table.set_column(schema.get_field_index(name), field, column.cast(field.type))
    return table.replace_schema_metadata(schema.metadata)


def _refuse_bad_weight(scores: pa.Table, weight: np.ndarray, keep: np.ndarray) -> None:
    """A weighted method's weights must fit the keep mask and have a column to go to (one line naming the problem)."""
    if WEIGHT not in scores.column_names:
        raise ValueError("a weighted selection needs a 'weight' column in the table it writes (scores written before "
                         "sstoken stored weights have none); select into a masks folder (`sstoken select --output`)")
    for problem, flags in weight_flags(np.asarray(weight), keep.astype(bool)):
        if flags.any():
            raise ValueError(f"the selection's {problem} at {int(flags.sum())} tokens (first at flat position "
                             f"{int(np.flatnonzero(flags)[0])}); this is a bug in the selection method")


def selected_table(
    scores: pa.Table, trainable: pa.ChunkedArray, selection: CorpusSelection, keep: np.ndarray | None = None
) -> pa.Table:
    """`scores` with score, keep, n_kept (and weight) from `selection`: keep per sample (top-k of each), or the
    flat `keep` a global selection found (granularity global); a weighted method's weights from its score.
    Samples the sample filter drops keep nothing (and weigh 0)."""
    rows = selection.sample_scores(scores, trainable)
    if keep is None:
        if selection.settings.granularity != "sample":
            raise ValueError("a global selection passes its keep mask; this is a bug")
        masks = row_arrays(trainable, bool)
        kept_rows = selection.sample_stays(scores, trainable, rows)
        keep_rows = [sample_keep(s, m, selection.settings) & stay for s, m, stay in zip(rows, masks, kept_rows)]
        keep = np.concatenate(keep_rows) if keep_rows else np.zeros(0, bool)
    score = np.concatenate(rows) if rows else np.zeros(0, np.float32)
    return with_selection(scores, score, keep, selection_weight(score, keep, selection.settings))
