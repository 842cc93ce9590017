"""The scoring engine: per-token NLLs under two checkpoints, attention importance, scores and keep masks.

Every per-token array has len(input_ids) entries; entry i is about token i as a target
(nll[i] = -log P(x_i | x_<i)), NaN / False where i is not a target. The Ray job drives this
through `Scorer.score_samples` and `score_shard`; nothing here knows about Ray.

Work skipped on purpose:
- gamma == 1: no attention capture at all (attn is NaN).
- gamma == 0: no history forward at all (nll_hist and rel are NaN); nll_cur is still reported,
  since the current forward runs anyway for attention and its head costs only the target rows.
- history None, or the same fingerprint as current: no history model is loaded; nll_hist equals
  nll_cur and rel is 0 at every target.
- history NLLs passed in (from the cache): no history forward.

Two passes instead of both models at once (what the Ray job does, so only one model is resident):
`history_scorer(history, settings)` is a Scorer over the history checkpoint alone (gamma 1: no
attention capture), `history_nll_table(scorer, tokenized)` gives its history_nll.v1 table, and
`score_shard(Scorer(current, history, settings), tokenized, that_table)` scores without ever
loading the history model. The NLLs are the ones the combined path computes: same forward, same
micro-batches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from transformers import AutoConfig

from pipeline.engine.attention import REQUEST_KWARG, ImportanceRequest, register_importance_attention
from pipeline.engine.batching import length_sorted_batches, right_padded
from pipeline.core.checkpoints import checkpoint_fingerprint, load_model
from pipeline.engine.nll import output_head, target_nll
from pipeline.engine.precision import MIXED_BFLOAT16, compute_precision, load_dtype, precision_name, to_mixed_precision
from pipeline.artifacts.schemas import arrow_schema
from pipeline.engine.selection import combine, minmax_normalise, select_sample
from pipeline.engine.settings import ScoreSettings


@dataclass
class SampleScores:
    """Scores of one sample; every array has one entry per token (entry i = token i as a target)."""

    sample_id: str
    nll_cur: np.ndarray
    nll_hist: np.ndarray
    rel: np.ndarray
    attn: np.ndarray
    score: np.ndarray
    keep: np.ndarray


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but torch sees no CUDA device; use device 'cpu' or 'auto'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _available_cpus() -> int:
    """Cores this process may run on (its affinity mask, which Ray and containers narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _decoder(model: Any) -> torch.nn.Module:
    """The model body without the LM head (`model.model` for Llama, Qwen2, ...)."""
    return getattr(model, model.base_model_prefix)


def _layer_index(model: Any, layer: int, folder: Path | str) -> int:
    count = int(model.config.num_hidden_layers)
    if not -count <= layer < count:
        raise ValueError(f"layer {layer} is out of range: the model in {folder} has {count} layers ({-count}..{count - 1})")
    index = layer % count
    layer_types = getattr(model.config, "layer_types", None)
    if layer_types and layer_types[index] != "full_attention":
        raise ValueError(
            f"layer {layer} of the model in {folder} uses '{layer_types[index]}' attention; "
            "importance needs a full causal attention layer, choose another layer"
        )
    return index


class Scorer:
    """Holds the current (and, when needed, history) model and scores batches of tokenized samples.

    Attributes a driver uses: `current_fingerprint` / `history_fingerprint` (history None means
    history == current), `dtype_name` (part of the history cache key), `uses_history` (False when
    no history NLLs are needed: same checkpoint or gamma == 0), `forward_counts` (micro-batch
    forwards run so far, per model), `model_loads` (models loaded so far) and `models_resident`.
    """

    def __init__(self, current: Path | str, history: Path | str | None, settings: ScoreSettings):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype_name = precision_name(settings.dtype)
        if self.device.type == "cpu":
            torch.set_num_threads(settings.threads or _available_cpus())
        self.current_fingerprint = checkpoint_fingerprint(current)
        self.history_fingerprint = checkpoint_fingerprint(history) if history is not None else self.current_fingerprint
        self.same_checkpoint = self.history_fingerprint == self.current_fingerprint
        self.uses_attention = settings.gamma < 1.0
        self.uses_history = settings.gamma > 0.0 and not self.same_checkpoint
        self.forward_counts = {"current": 0, "history": 0}
        self.model_loads = 0

        self.current = self._load(current)
        # The importance layer matters only with attention (gamma < 1); a history_scorer over a model
        # of another depth or layer layout must not trip over it.
        self.layer_idx = _layer_index(self.current, settings.layer, current) if self.uses_attention else None
        if self.uses_attention:
            self.current.set_attn_implementation(register_importance_attention())
        # The history model loads on first use: with every shard's history NLLs cached, it never does.
        self.history: Any | None = None
        self._history_path = history
        self._vocab_limit = self.current.get_input_embeddings().num_embeddings
        if self.uses_history:
            history_config = AutoConfig.from_pretrained(
                history, local_files_only=True, trust_remote_code=settings.trust_remote_code
            )
            self._vocab_limit = min(self._vocab_limit, int(history_config.vocab_size))

    def _load(self, path: Path | str) -> Any:
        model = load_model(path, load_dtype(self.dtype_name), "cpu", trust_remote_code=self.settings.trust_remote_code)
        if self.dtype_name == MIXED_BFLOAT16:
            to_mixed_precision(model)
        self.model_loads += 1
        return model.to(self.device)

    @property
    def models_resident(self) -> int:
        """Models this Scorer holds now: the current one, plus the history one once it was needed."""
        return 1 + (self.history is not None)

    def _history_model(self) -> Any:
        if self.history is None:
            self.history = self._load(self._history_path)
        return self.history

    # -- inputs ---------------------------------------------------------------------------------

    def _check_inputs(
        self,
        sample_ids: Sequence[str],
        input_ids: Sequence[np.ndarray],
        trainable: Sequence[np.ndarray],
        history_nll: Sequence[np.ndarray] | None,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        if not len(sample_ids) == len(input_ids) == len(trainable):
            raise ValueError(
                f"sample_ids, input_ids and trainable must have the same length, got "
                f"{len(sample_ids)}, {len(input_ids)} and {len(trainable)}"
            )
        if history_nll is not None and len(history_nll) != len(sample_ids):
            raise ValueError(f"history_nll has {len(history_nll)} entries for {len(sample_ids)} samples")
        vocab = self._vocab_limit
        ids_out, masks_out = [], []
        for index, sample_id in enumerate(sample_ids):
            ids = np.asarray(input_ids[index])
            mask = np.asarray(trainable[index])
            if ids.ndim != 1 or len(ids) == 0:
                raise ValueError(f"sample {sample_id!r}: input_ids must be a non-empty 1-D array, got shape {ids.shape}")
            if mask.shape != ids.shape:
                raise ValueError(
                    f"sample {sample_id!r}: trainable has {mask.size} entries but input_ids has {len(ids)}"
                )
            if mask.dtype != bool:
                raise ValueError(f"sample {sample_id!r}: trainable must be boolean, got {mask.dtype}")
            if mask[0]:
                raise ValueError(f"sample {sample_id!r}: trainable[0] is true, but position 0 is never a target")
            if ids.min() < 0 or ids.max() >= vocab:
                raise ValueError(
                    f"sample {sample_id!r}: token ids must lie in [0, {vocab}) for this model, "
                    f"found {ids.min()}..{ids.max()}; was the data tokenized with another tokenizer?"
                )
            if history_nll is not None and self.uses_history:
                cached = np.asarray(history_nll[index])
                if cached.shape != ids.shape:
                    raise ValueError(
                        f"sample {sample_id!r}: history_nll has {cached.size} entries but input_ids has {len(ids)}"
                    )
                if np.isnan(cached[mask]).any():
                    raise ValueError(
                        f"sample {sample_id!r}: history_nll is NaN at a target; the cached NLLs do not match this data"
                    )
            ids_out.append(ids.astype(np.int64))
            masks_out.append(mask)
        return ids_out, masks_out

    # -- forwards -------------------------------------------------------------------------------

    def _forward_nll(
        self, model: Any, ids: list[np.ndarray], masks: list[np.ndarray], request: ImportanceRequest | None
    ) -> list[np.ndarray]:
        """Target NLLs (fp32, one array of n_trainable per sample) of one right-padded micro-batch."""
        input_ids, attention_mask = right_padded(ids)
        input_ids = input_ids.to(self.device)
        padded = bool((attention_mask == 0).any())
        # No padding: pass no mask, so SDPA can take its is_causal path.
        mask_arg = attention_mask.to(self.device) if padded else None
        extra = {REQUEST_KWARG: request} if request is not None else {}
        with compute_precision(self.dtype_name, self.device):
            decoder = _decoder(model)
            hidden = decoder(input_ids=input_ids, attention_mask=mask_arg, use_cache=False, **extra).last_hidden_state
        targets = torch.zeros(input_ids.shape, dtype=torch.bool)
        for row, mask in enumerate(masks):
            targets[row, : len(mask)] = torch.as_tensor(mask)
        head, softcap = output_head(model)
        nll = target_nll(hidden.float(), input_ids, targets.to(self.device), head, softcap).cpu().numpy()
        return np.split(nll, np.cumsum([int(m.sum()) for m in masks])[:-1])

    def score_samples(
        self,
        sample_ids: Sequence[str],
        input_ids: Sequence[np.ndarray],
        trainable: Sequence[np.ndarray],
        history_nll: Sequence[np.ndarray] | None = None,
    ) -> list[SampleScores]:
        """Score samples (any order, any lengths); returns one SampleScores per sample, in input order.

        history_nll: cached history NLLs (full length, NaN off targets) to use instead of a history
        forward; ignored when no history model is in play (same checkpoint, or gamma == 0).
        """
        ids, masks = self._check_inputs(sample_ids, input_ids, trainable, history_nll)
        run_history = self.uses_history and history_nll is None
        n = len(ids)
        nll_cur: list[np.ndarray | None] = [None] * n
        nll_hist: list[np.ndarray | None] = [None] * n
        attn: list[np.ndarray | None] = [None] * n
        with torch.inference_mode():
            for batch in length_sorted_batches([len(x) for x in ids], self.settings.max_batch_tokens):
                batch_ids = [ids[i] for i in batch]
                batch_masks = [masks[i] for i in batch]
                request = (
                    ImportanceRequest.for_batch(self.layer_idx, batch_masks, self.device) if self.uses_attention else None
                )
                current = self._forward_nll(self.current, batch_ids, batch_masks, request)
                self.forward_counts["current"] += 1
                if request is not None and request.result is None:
                    raise RuntimeError(
                        f"layer {self.layer_idx} never reached the importance attention function; "
                        f"{type(self.current).__name__} may not use transformers' attention interface"
                    )
                history = self._forward_nll(self._history_model(), batch_ids, batch_masks, None) if run_history else None
                if run_history:
                    self.forward_counts["history"] += 1
                for slot, index in enumerate(batch):
                    nll_cur[index] = current[slot]
                    if history is not None:
                        nll_hist[index] = history[slot]
                    if request is not None:
                        attn[index] = request.result[slot].cpu().numpy()
        results = []
        for index in range(n):
            mask = masks[index]
            cached = None
            if self.uses_history and not run_history:
                cached = np.asarray(history_nll[index], dtype=np.float32)[mask]
            results.append(
                self._finish(sample_ids[index], mask, nll_cur[index], nll_hist[index] if run_history else cached, attn[index])
            )
        return results

    # -- per-sample combination -----------------------------------------------------------------

    def _finish(
        self,
        sample_id: str,
        mask: np.ndarray,
        nll_cur_targets: np.ndarray,
        nll_hist_targets: np.ndarray | None,
        attn_targets: np.ndarray | None,
    ) -> SampleScores:
        def full(values: np.ndarray | None) -> np.ndarray:
            out = np.full(len(mask), np.nan, dtype=np.float32)
            if values is not None:
                out[mask] = values
            return out

        settings = self.settings
        nll_cur = full(nll_cur_targets)
        if self.uses_history:
            nll_hist = full(nll_hist_targets)
        elif self.same_checkpoint and settings.gamma > 0.0:
            nll_hist = nll_cur.copy()
        else:
            nll_hist = full(None)
        rel = nll_hist - nll_cur if settings.excess == "history_minus_current" else nll_cur - nll_hist
        rel_normalised = minmax_normalise(rel, mask) if settings.gamma > 0.0 else full(None)
        attn = full(attn_targets)
        score = combine(rel_normalised, attn, settings.gamma)
        keep = select_sample(score, mask, settings.ratio)
        return SampleScores(sample_id, nll_cur, nll_hist, rel.astype(np.float32), attn, score, keep)


# -- Arrow shards -------------------------------------------------------------------------------


def _list_values(column: pa.ChunkedArray | pa.Array, dtype: Any) -> list[np.ndarray]:
    """Split a list<...> column into one numpy array per row."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = array.offsets.to_numpy()
    values = array.values.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return [values[offsets[i] : offsets[i + 1]] for i in range(len(array))]


def _list_column(arrays: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    offsets = np.concatenate(([0], np.cumsum([len(a) for a in arrays]))).astype(np.int32)
    values = np.concatenate(arrays) if arrays else np.array([])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, value_type))


def _history_by_sample(history_nll: pa.Table, sample_ids: list[str]) -> list[np.ndarray]:
    """Rows of a history_nll table reordered to `sample_ids`, joined by sample_id."""
    known = history_nll.column("sample_id").to_pylist()
    row_of = {sample_id: row for row, sample_id in enumerate(known)}
    if len(row_of) != len(known):
        raise ValueError("history_nll table has duplicate sample_id values; it cannot be joined")
    missing = [s for s in sample_ids if s not in row_of]
    if missing:
        raise ValueError(
            f"history_nll table lacks {len(missing)} of this shard's samples (first: {missing[0]!r}); "
            "it was made from other data: delete it so it is recomputed"
        )
    rows = _list_values(history_nll.column("nll"), np.float32)
    return [rows[row_of[s]] for s in sample_ids]


def _tokenized_columns(tokenized: pa.Table) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """(sample ids, input ids, trainable masks) of a tokenized.v1 table."""
    missing = [c for c in ("sample_id", "input_ids", "trainable") if c not in tokenized.column_names]
    if missing:
        raise ValueError(f"tokenized table lacks column(s) {', '.join(missing)}; expected a tokenized.v1 shard")
    sample_ids = tokenized.column("sample_id").to_pylist()
    return sample_ids, _list_values(tokenized.column("input_ids"), np.int64), _list_values(tokenized.column("trainable"), bool)


def _history_table(sample_ids: list[str], nlls: list[np.ndarray]) -> pa.Table:
    return pa.Table.from_arrays(
        [pa.array(sample_ids, pa.string()), _list_column(nlls, pa.float32())], schema=arrow_schema("history_nll")
    )


def history_scorer(history: Path | str, settings: ScoreSettings) -> Scorer:
    """A Scorer holding only the history checkpoint (as its 'current' model), for `history_nll_table`.

    gamma 1 and no second checkpoint: no attention capture and no other model, so its forward is the
    one the two-model Scorer runs for history NLLs. The dtype, device and batch budget are kept.
    """
    return Scorer(history, None, settings.model_copy(update={"gamma": 1.0}))


def history_nlls(
    scorer: Scorer, sample_ids: Sequence[str], input_ids: Sequence[np.ndarray], trainable: Sequence[np.ndarray]
) -> list[np.ndarray]:
    """Per-sample NLLs (full length, NaN off targets) of a `history_scorer`'s model, in input order:
    what `Scorer.score_samples(..., history_nll=...)` takes instead of running a history forward."""
    if scorer.uses_attention or scorer.uses_history:
        raise ValueError("history NLLs need a single-model Scorer without attention; build it with history_scorer()")
    return [r.nll_cur for r in scorer.score_samples(sample_ids, input_ids, trainable)]


def history_nll_table(scorer: Scorer, tokenized: pa.Table) -> pa.Table:
    """The history_nll.v1 table of one tokenized shard under `scorer`'s model (see `history_scorer`).

    Row order is the shard's; equals the `nll_hist` a two-model Scorer with that history computes.
    """
    sample_ids, input_ids, trainable = _tokenized_columns(tokenized)
    return _history_table(sample_ids, history_nlls(scorer, sample_ids, input_ids, trainable))


def score_shard(
    scorer: Scorer, tokenized: pa.Table, history_nll: pa.Table | None = None
) -> tuple[pa.Table, pa.Table | None]:
    """Score one tokenized shard.

    Returns (scores table, schema scores.v1, in the shard's row order; history NLL table, schema
    history_nll.v1, when a history forward ran here, else None).
    """
    sample_ids, input_ids, trainable = _tokenized_columns(tokenized)
    cached = _history_by_sample(history_nll, sample_ids) if history_nll is not None and scorer.uses_history else None
    results = scorer.score_samples(sample_ids, input_ids, trainable, cached)

    def lists(name: str, value_type: pa.DataType) -> pa.Array:
        return _list_column([getattr(r, name) for r in results], value_type)

    counts = {
        "n_tokens": [len(r.keep) for r in results],
        "n_trainable": [int(m.sum()) for m in trainable],
        "n_kept": [int(r.keep.sum()) for r in results],
    }
    scores = pa.Table.from_arrays(
        [
            pa.array(sample_ids, pa.string()),
            *(lists(name, pa.float32()) for name in ("nll_cur", "nll_hist", "rel", "attn", "score")),
            lists("keep", pa.bool_()),
            *(pa.array(counts[name], pa.int32()) for name in ("n_tokens", "n_trainable", "n_kept")),
        ],
        schema=arrow_schema("scores"),
    )
    history = None
    if scorer.uses_history and cached is None:
        history = _history_table(sample_ids, [r.nll_hist for r in results])
    return scores, history
