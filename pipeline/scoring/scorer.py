"""The scoring engine: one checkpoint's per-token NLL and, when asked, attention importance.

Every per-token array has len(input_ids) entries; entry i is about token i as a target
(nll[i] = -log P(x_i | x_<i)), NaN where i is not a target. A `Scorer` holds ONE model. A run that
needs two checkpoints runs two passes, so only one model is ever resident:

    history = Scorer(history_path, settings, importance=False)
    table = nll_table(history, tokenized)                      # history_nll.v1 (what the cache stores)
    current = Scorer(current_path, settings, importance=selection.uses_attention, entropy=selection.uses_entropy)
    scores = score_shard(current, tokenized, selection, history_nll=table)   # scores.v1

`score_shard` writes the signals (nll_cur, nll_hist, rel, attn, entropy_cur) and the per-sample selection of
`pipeline.selection.methods` (score, keep); the select stage recomputes score and keep from the
signals without a model. Nothing here knows about Ray.

Work skipped on purpose (the score stage stores every signal unless told `signals: needed`):
- no importance asked (signals needed, gamma 1, REL-only methods): no attention capture (attn is NaN).
- REL not stored (signals needed, gamma 0, attn, full, random, loss, confidence, entropy): no history pass
  (nll_hist, rel NaN).
- no entropy asked (signals needed and a method other than entropy; always in the history pass): entropy_cur
  is NaN. Asked, it costs no second head pass: it comes from the log-softmax of the chunk the NLL is taken
  from (`pipeline.scoring.nll.gathered_nll_entropy`).
- current and history the same checkpoint: no history pass; nll_hist equals nll_cur, rel is 0.
- history NLLs cached: no history pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.runtime.checkpoints import checkpoint_fingerprint, load_model
from pipeline.runtime.errors import UserError
from pipeline.runtime.ray_session import machine_cpus
from pipeline.runtime.schemas import arrow_schema
from pipeline.scoring.attention import register_importance_attention
from pipeline.scoring.batching import length_sorted_batches
from pipeline.scoring.device_budget import device_budget
from pipeline.scoring.nll import output_head
from pipeline.scoring.precision import FULL_BFLOAT16, apply_precision, compute_precision, load_dtype, precision_name
from pipeline.scoring.score_settings import ScoreSettings, SignalSet, signals_to_compute
from pipeline.scoring.scoring_batch import plan_scoring_batch, split_counts
from pipeline.scoring.signal_forward import ForwardOptions, signal_forward
from pipeline.selection.keep_tables import CorpusSelection, row_arrays, selected_table
from pipeline.selection.select_settings import SelectSettings


@dataclass
class TokenSignals:
    """One model's signals for one sample, full length: NLL, importance and entropy (None when not asked)."""

    sample_id: str
    nll: np.ndarray
    attn: np.ndarray | None
    entropy: np.ndarray | None = None


class BatchSignals(NamedTuple):
    """One micro-batch's target values per sample (n_trainable each): NLL, importance and entropy (None when
    this Scorer does not compute them)."""

    nll: list[np.ndarray]
    attn: list[np.ndarray] | None
    entropy: list[np.ndarray] | None


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("device 'cuda' was requested but torch sees no CUDA device; use device 'cpu' or 'auto'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def layer_index(model: Any, layer: int, folder: Path | str) -> int:
    count = int(model.config.num_hidden_layers)
    if not -count <= layer < count:
        raise UserError(
            f"layer {layer} is out of range: the model in {folder} has {count} layers ({-count}..{count - 1})"
        )
    index = layer % count
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and layer_types[index] != "full_attention":
        raise UserError(
            f"layer {layer} of the model in {folder} uses '{layer_types[index]}' attention; "
            "importance needs a full causal attention layer, choose another layer"
        )
    return index


def full_length(mask: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Target values spread to the sample's length, NaN off the targets (and everywhere for None)."""
    out = np.full(len(mask), np.nan, dtype=np.float32)
    if values is not None:
        out[mask] = values
    return out


class Scorer:
    """Holds one checkpoint and gives per-token NLLs (and importance, when built with importance=True; the
    predictive entropy, when built with entropy=True).

    Attributes a driver uses: `fingerprint`, `dtype_name` (the resolved precision mode, part of the
    history cache key), `device`, `budget` (micro-batch tokens and chunk sizes on that device),
    `forward_count` (micro-batch forwards run so far), `model_loads` (always 1), `vocab_size` (|V|: the rows of
    the LM head, over which the entropy is taken).
    """

    def __init__(self, checkpoint: Path | str, settings: ScoreSettings, importance: bool, entropy: bool = False):
        self.settings = settings
        self.importance = importance
        self.entropy = entropy
        self.device = resolve_device(settings.device)
        self.dtype_name = precision_name(settings.dtype, self.device)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.threads or machine_cpus())
        self.fingerprint = checkpoint_fingerprint(checkpoint)
        model = load_model(checkpoint, load_dtype(self.dtype_name), "cpu", trust_remote_code=settings.trust_remote_code)
        apply_precision(model, self.dtype_name)
        self.model = model.to(self.device)
        self.model_loads = 1
        self.forward_count = 0
        # The importance layer matters only with attention; a NLL-only pass over a model of another
        # depth or layer layout must not trip over it.
        self.layer_idx = layer_index(self.model, settings.layer, checkpoint) if importance else None
        if importance:
            self.model.set_attn_implementation(register_importance_attention())
        self._vocab_limit = self.model.get_input_embeddings().num_embeddings
        self.vocab_size = int(output_head(self.model)[0].weight.shape[0])
        # QK^T of the importance recompute on tensor cores in the full-bf16 mode; float32 otherwise.
        self._score_matmul_dtype = torch.bfloat16 if self.dtype_name == FULL_BFLOAT16 else torch.float32
        # Measured once the model is resident: on CUDA the budget follows from the memory left free.
        element_bytes = 2 if self.dtype_name == FULL_BFLOAT16 else 4  # the mixed mode's residual stream is fp32
        self.budget = device_budget(
            self.device, self.model.config, settings.max_batch_tokens, settings.gpu_batch_tokens, element_bytes
        )

    # -- inputs ---------------------------------------------------------------------------------

    def _check_inputs(
        self, sample_ids: Sequence[str], input_ids: Sequence[np.ndarray], trainable: Sequence[np.ndarray]
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not len(sample_ids) == len(input_ids) == len(trainable):
            raise ValueError(
                f"sample_ids, input_ids and trainable must have the same length, got "
                f"{len(sample_ids)}, {len(input_ids)} and {len(trainable)}"
            )
        ids_out, masks_out = [], []
        for index, sample_id in enumerate(sample_ids):
            ids = np.asarray(input_ids[index])
            mask = np.asarray(trainable[index])
            if ids.ndim != 1 or len(ids) == 0:
                raise ValueError(f"sample {sample_id!r}: input_ids must be a non-empty 1-D array, got shape {ids.shape}")
            if mask.shape != ids.shape:
                raise ValueError(f"sample {sample_id!r}: trainable has {mask.size} entries but input_ids has {len(ids)}")
            if mask.dtype != bool:
                raise ValueError(f"sample {sample_id!r}: trainable must be boolean, got {mask.dtype}")
            if mask[0]:
                raise ValueError(f"sample {sample_id!r}: trainable[0] is true, but position 0 is never a target")
            if ids.min() < 0 or ids.max() >= self._vocab_limit:
                raise UserError(
                    f"sample {sample_id!r}: token ids must lie in [0, {self._vocab_limit}) for this model, "
                    f"found {ids.min()}..{ids.max()}; was the data tokenized with another tokenizer?"
                )
            ids_out.append(ids.astype(np.int64))
            masks_out.append(mask)
        return ids_out, masks_out

    # -- one micro-batch ------------------------------------------------------------------------

    def forward(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> BatchSignals:
        """One right-padded micro-batch: target NLLs (fp32, n_trainable per sample) and, when this
        Scorer computes them, the target importances and entropies (same shape); else None.

        Indices come from the host (`pipeline.scoring.scoring_batch`), results go back in one copy:
        nothing in between waits for the device."""
        plan = plan_scoring_batch(ids, masks)
        options = ForwardOptions(
            layer_idx=self.layer_idx if self.importance else None, entropy=self.entropy,
            block_elements=self.budget.score_block_elements, logit_chunk_elements=self.budget.logit_chunk_elements,
            matmul_dtype=self._score_matmul_dtype,
        )
        nll, importance, entropy = signal_forward(self.model, plan, self.device, options,
                                                  compute_precision(self.dtype_name, self.device))
        self.forward_count += 1
        rows = [nll, *(t for t in (importance, entropy) if t is not None)]
        copied = torch.stack(rows).cpu().numpy()  # the one copy back of this micro-batch
        values = iter(split_counts(row, plan.counts) for row in copied)
        nlls = next(values)
        return BatchSignals(nlls, next(values) if importance is not None else None,
                            next(values) if entropy is not None else None)

    # -- many samples ---------------------------------------------------------------------------

    def token_signals(
        self, sample_ids: Sequence[str], input_ids: Sequence[np.ndarray], trainable: Sequence[np.ndarray]
    ) -> list[TokenSignals]:
        """Samples in any order and length, in length-sorted micro-batches; results in input order."""
        ids, masks = self._check_inputs(sample_ids, input_ids, trainable)
        results: list[TokenSignals | None] = [None] * len(ids)
        with torch.inference_mode():
            for batch in length_sorted_batches([len(x) for x in ids], self.budget.batch_tokens):
                found = self.forward([ids[i] for i in batch], [masks[i] for i in batch])
                for slot, index in enumerate(batch):
                    mask = masks[index]
                    attn = full_length(mask, found.attn[slot]) if found.attn is not None else None
                    entropy = full_length(mask, found.entropy[slot]) if found.entropy is not None else None
                    results[index] = TokenSignals(sample_ids[index], full_length(mask, found.nll[slot]), attn, entropy)
        return results  # type: ignore[return-value]


# -- signals of both checkpoints ------------------------------------------------------------------


@dataclass
class SampleSignals:
    """What the score stage stores for one sample (full length, NaN off the targets)."""

    sample_id: str
    nll_cur: np.ndarray
    nll_hist: np.ndarray
    rel: np.ndarray
    attn: np.ndarray
    entropy_cur: np.ndarray


def combine_signals(
    current: list[TokenSignals],
    history_nll: Sequence[np.ndarray] | None,
    trainable: Sequence[np.ndarray],
    *,
    same_checkpoint: bool,
    uses_rel: bool,
    excess: str,
) -> list[SampleSignals]:
    """The current pass's signals joined with the history NLLs (full length, input order).

    REL is `nll_hist - nll_cur` (history_minus_current) or the reverse. With the same checkpoint
    nll_hist is nll_cur and REL is 0; when REL is not used, nll_hist and rel are NaN; so are attn and
    entropy_cur where the current pass did not compute them.
    """
    if uses_rel and not same_checkpoint and history_nll is None:
        raise ValueError("REL needs the history NLLs: run the history pass (nll_table) first and pass them in")
    if history_nll is not None and len(history_nll) != len(current):
        raise ValueError(f"history_nll has {len(history_nll)} entries for {len(current)} samples")
    out = []
    for index, signals in enumerate(current):
        mask = np.asarray(trainable[index], dtype=bool)
        nan = full_length(mask, None)
        if not uses_rel:
            nll_hist = nan
        elif same_checkpoint:
            nll_hist = signals.nll.copy()
        else:
            nll_hist = np.asarray(history_nll[index], dtype=np.float32)  # type: ignore[index]
            if nll_hist.shape != mask.shape:
                raise UserError(
                    f"sample {signals.sample_id!r}: history_nll has {nll_hist.size} entries but input_ids has {len(mask)}"
                )
            if np.isnan(nll_hist[mask]).any():
                raise UserError(
                    f"sample {signals.sample_id!r}: history_nll is NaN at a target; the cached NLLs do not match this data"
                )
            nll_hist = np.where(mask, nll_hist, np.float32(np.nan)).astype(np.float32)
        rel = nll_hist - signals.nll if excess == "history_minus_current" else signals.nll - nll_hist
        attn = signals.attn if signals.attn is not None else nan
        entropy = signals.entropy if signals.entropy is not None else nan
        out.append(SampleSignals(signals.sample_id, signals.nll, nll_hist, rel.astype(np.float32), attn, entropy))
    return out


# -- Arrow shards -------------------------------------------------------------------------------


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.array([])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _history_by_sample(history_nll: pa.Table, sample_ids: list[str]) -> list[np.ndarray]:
    """Rows of a history_nll table reordered to `sample_ids`, joined by sample_id."""
    known = history_nll.column("sample_id").to_pylist()
    row_of = {sample_id: row for row, sample_id in enumerate(known)}
    if len(row_of) != len(known):
        raise UserError("history_nll table has duplicate sample_id values; it cannot be joined")
    missing = [s for s in sample_ids if s not in row_of]
    if missing:
        raise UserError(
            f"history_nll table lacks {len(missing)} of this shard's samples (first: {missing[0]!r}); "
            "it was made from other data: delete it so it is recomputed"
        )
    rows = row_arrays(history_nll.column("nll"), np.float32)
    return [rows[row_of[s]] for s in sample_ids]


def _tokenized_columns(tokenized: pa.Table) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(sample ids, input ids, trainable masks) of a tokenized.v1 table."""
    missing = [c for c in ("sample_id", "input_ids", "trainable") if c not in tokenized.column_names]
    if missing:
        raise UserError(f"tokenized table lacks column(s) {', '.join(missing)}; expected a tokenized.v1 shard")
    sample_ids = tokenized.column("sample_id").to_pylist()
    return sample_ids, row_arrays(tokenized.column("input_ids"), np.int64), row_arrays(tokenized.column("trainable"), bool)


def nll_table(scorer: Scorer, tokenized: pa.Table) -> pa.Table:
    """The history pass over one tokenized shard: its history_nll.v1 table, in the shard's row order."""
    sample_ids, input_ids, trainable = _tokenized_columns(tokenized)
    nlls = [s.nll for s in scorer.token_signals(sample_ids, input_ids, trainable)]
    return pa.Table.from_arrays(
        [pa.array(sample_ids, pa.string()), _list_column(nlls, pa.float32())], schema=arrow_schema("history_nll")
    )


def signals_table(signals: list[SampleSignals], trainable: Sequence[np.ndarray]) -> pa.Table:
    """A scores.v1 table of the signals, with no selection yet (score NaN, keep false, weight 0)."""

    def lists(name: str) -> pa.Array:
        return _list_column([getattr(s, name) for s in signals], pa.float32())

    lengths = [len(s.nll_cur) for s in signals]
    n_trainable = [int(np.count_nonzero(mask)) for mask in trainable]
    return pa.Table.from_arrays(
        [
            pa.array([s.sample_id for s in signals], pa.string()),
            *(lists(name) for name in ("nll_cur", "nll_hist", "rel", "attn", "entropy_cur")),
            _list_column([np.full(n, np.nan, np.float32) for n in lengths], pa.float32()),
            _list_column([np.zeros(n, bool) for n in lengths], pa.bool_()),
            _list_column([np.zeros(n, np.float32) for n in lengths], pa.float32()),
            pa.array(lengths, pa.int32()),
            pa.array(n_trainable, pa.int32()),
            pa.array([0] * len(signals), pa.int32()),
        ],
        schema=arrow_schema("scores"),
    )


def score_shard(
    scorer: Scorer,
    tokenized: pa.Table,
    selection: SelectSettings,
    *,
    history_nll: pa.Table | None = None,
    same_checkpoint: bool = False,
    excess: str = "history_minus_current",
    signals: SignalSet | None = None,
) -> pa.Table:
    """The current pass over one tokenized shard: signals plus the per-sample selection (scores.v1).

    `history_nll`: the history pass's table (joined by sample_id), needed when `selection` uses REL
    and the checkpoints differ. A global selection is made afterwards over every shard; here its
    keep stays per sample. The selection assumes REL is a signal: the corpus-wide floor check is
    the select step's (`pipeline.selection.methods.rel_guard`). `signals`: which signals to store
    (default: those the selection uses); attention and entropy come from the Scorer, so it must compute them.
    """
    signals = signals or signals_to_compute("needed", selection)
    if signals.attention and not scorer.importance:
        raise ValueError("the signals to store need attention importance but the Scorer was built with importance=False")
    if signals.entropy and not scorer.entropy:
        raise ValueError("the signals to store need the entropy but the Scorer was built with entropy=False")
    sample_ids, input_ids, trainable = _tokenized_columns(tokenized)
    cached = _history_by_sample(history_nll, sample_ids) if history_nll is not None and signals.rel else None
    stored = combine_signals(
        scorer.token_signals(sample_ids, input_ids, trainable), cached, trainable,
        same_checkpoint=same_checkpoint, uses_rel=signals.rel, excess=excess,
    )
    selection_here = CorpusSelection(selection.within_shard(), vocab_size=scorer.vocab_size)
    return selected_table(signals_table(stored, trainable), tokenized.column("trainable"), selection_here)
