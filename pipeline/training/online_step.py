"""Online selection inside a training step: the step's own forward scores its tokens, keeps the top ratio of each
sample with the select stage's code, and the loss runs over the kept ones.

    loss = OnlineLoss(settings, options, device)            # a train_step loss (pipeline.training.train_step)
    result = train_step(model, optimizer, [online_micro_batch(rows), ...], lr, clip, precision, loss)
    loss.selected                                            # each sample's score and keep, in the order trained

One forward per micro-batch (`pipeline.scoring.signal_forward`, the scorer's own): the current model's NLL of
EVERY target (with its graph), the chosen layer's importance (recomputed under no-grad) and, for the entropy
method, the predictive entropy from the same logits. The history NLLs come from the score stage's cache. Then
the very functions `sstoken score` / `sstoken select` run per sample: `combine_signals` (REL in the method's
direction), the REL guard (`rel_guard`, over the micro-batch: offline it is over the corpus), `sample_score` and
`sample_keep` (top-k, ties to the earlier position). The loss is the NLL sum over the kept targets; the step
divides it by the global batch's kept count, which `selection_size` knows before the forward (as the masked
trainer's labels do), so accumulation and ranks normalise exactly as masked training does.

The extra cost over masked training: the LM head over every target instead of the kept ones, and one layer's
importance recompute (README, Performance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import torch

from pipeline.runtime.schemas import arrow_schema
from pipeline.scoring.scorer import TokenSignals, combine_signals, full_length
from pipeline.scoring.scoring_batch import ScoringBatch, plan_scoring_batch, split_counts
from pipeline.scoring.signal_forward import ForwardOptions, signal_forward
from pipeline.scoring.nll import output_head
from pipeline.selection.methods import RelStats, rel_guard, sample_keep, sample_score, selection_size, selection_weight
from pipeline.selection.select_settings import SelectSettings
from pipeline.training.online_data import OnlineRow
from pipeline.training.online_history import MovingHistory


@dataclass(frozen=True)
class OnlineMicroBatch:
    """One micro-batch's samples and the scorer's index plan of them (right-padded, targets row-major)."""

    rows: list[OnlineRow]
    plan: ScoringBatch

    @property
    def tokens(self) -> int:
        return sum(len(row.input_ids) for row in self.rows)


def online_micro_batch(rows: Sequence[OnlineRow]) -> OnlineMicroBatch:
    return OnlineMicroBatch(list(rows), plan_scoring_batch([r.input_ids for r in rows], [r.trainable for r in rows]))


@dataclass(frozen=True)
class SampleSelection:
    """One sample's selection in a step: its score (NaN off the targets) and keep mask, full length."""

    sample_id: str
    score: np.ndarray
    keep: np.ndarray
    targets: int
    weight: np.ndarray  # the loss weight of each token: keep as 0/1, a weighted method's score at the kept ones


def _host(values: torch.Tensor | None, counts: list[int]) -> list[np.ndarray] | None:
    return None if values is None else split_counts(values.detach().float().cpu().numpy(), counts)


def select_samples(
    rows: Sequence[OnlineRow], nll: torch.Tensor, importance: torch.Tensor | None, entropy: torch.Tensor | None,
    settings: SelectSettings, excess: str, vocab_size: int | None = None,
) -> tuple[list[SampleSelection], list[str]]:
    """Each sample's selection from one forward's target values (row-major, as `signal_forward` gives them), and
    the REL guard's warnings: the select stage's per-sample code on the signals the score stage would store."""
    trainable = [row.trainable for row in rows]
    counts = [int(np.count_nonzero(mask)) for mask in trainable]
    nlls, attns, entropies = _host(nll, counts), _host(importance, counts), _host(entropy, counts)
    current = [
        TokenSignals(row.sample_id, full_length(row.trainable, nlls[i]),
                     None if attns is None else full_length(row.trainable, attns[i]),
                     None if entropies is None else full_length(row.trainable, entropies[i]))
        for i, row in enumerate(rows)
    ]
    history = [row.history_nll for row in rows] if settings.uses_rel else None
    signals = combine_signals(current, history, trainable, same_checkpoint=False, uses_rel=settings.uses_rel,
                              excess=excess)
    stats = RelStats()
    for sample, mask in zip(signals, trainable):
        stats = stats.merge(RelStats.of(sample.rel, mask))
    warnings = rel_guard(settings, stats)
    noise = settings.uses_rel and stats.is_noise
    selected = []
    for sample, mask, count in zip(signals, trainable, counts):
        score = sample_score(sample.sample_id, sample.rel, sample.attn, mask, settings, noise, nll_cur=sample.nll_cur,
                             nll_hist=sample.nll_hist, entropy_cur=sample.entropy_cur, vocab_size=vocab_size)
        keep = sample_keep(score, mask, settings)
        weight = selection_weight(score, keep, settings)
        selected.append(SampleSelection(sample.sample_id, score, keep, count,
                                        keep.astype(np.float32) if weight is None else weight))
    return selected, warnings


@dataclass
class OnlineLoss:
    """A train_step loss that selects in the forward: `selected` gathers every micro-batch's selections, `warnings`
    the REL guard's findings (attention-only micro-batches). A weighted method (prob, entropy-gated) weighs each kept
    token by its score, detached; its weight total is known only after the forwards (`weight_in_forward`), so
    train_step accumulates the weighted sums and divides the gradients by the global total after them."""

    settings: SelectSettings
    options: ForwardOptions
    device: torch.device
    excess: str = "history_minus_current"
    history: MovingHistory | None = None  # previous / ema: the history NLLs come from these weights, not the cache
    selected: list[SampleSelection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    forward_weight: float = 0.0  # the weight total of the micro-batches run since the last `take_forward_weight`

    @property
    def weight_in_forward(self) -> bool:
        return self.settings.weighted

    def take_forward_weight(self) -> float:
        total, self.forward_weight = self.forward_weight, 0.0
        return total

    def totals(self, micro_batches: Sequence[OnlineMicroBatch]) -> tuple[int, int, float]:
        kept = sum(selection_size(self.settings, int(np.count_nonzero(r.trainable))) for b in micro_batches for r in b.rows)
        return kept, sum(b.tokens for b in micro_batches), float(kept)

    def __call__(self, model: torch.nn.Module, batch: OnlineMicroBatch) -> torch.Tensor:
        rows = batch.rows
        if self.history is not None and self.settings.uses_rel:
            found = self.history.nll(model, batch.plan, self.device, self.options.logit_chunk_elements)
            nlls = _host(found, batch.plan.counts) or []
            rows = [replace(row, history_nll=full_length(row.trainable, nll)) for row, nll in zip(rows, nlls)]
        nll, importance, entropy = signal_forward(model, batch.plan, self.device, self.options)
        vocab_size = int(output_head(model)[0].weight.shape[0]) if self.settings.method == "entropy-gated" else None
        selected, warnings = select_samples(rows, nll, importance, entropy, self.settings, self.excess, vocab_size)
        self.selected += selected
        self.warnings += [w for w in warnings if w not in self.warnings]
        kept = np.concatenate([s.keep[row.trainable] for s, row in zip(selected, batch.rows)])
        kept_nll = nll[torch.from_numpy(kept).to(nll.device)]
        if not self.settings.weighted:
            return kept_nll.sum()
        weight = np.concatenate([s.weight[row.trainable] for s, row in zip(selected, batch.rows)])[kept]
        self.forward_weight += float(weight.astype(np.float64).sum())
        return (kept_nll * torch.from_numpy(weight).to(device=nll.device, dtype=nll.dtype)).sum()


def _lists(arrays: Sequence[np.ndarray], value_type: pa.DataType) -> pa.Array:
    return pa.array([a.tolist() for a in arrays], pa.list_(value_type))


def selection_mask_table(selected: Sequence[SampleSelection], step: int) -> pa.Table:
    """The masks.v1 shard of one step's selections (weight: keep as 0/1, a weighted method's weights)."""
    keeps = [s.keep for s in selected]
    return pa.Table.from_arrays(
        [
            pa.array([s.sample_id for s in selected], pa.string()),
            _lists([s.score for s in selected], pa.float32()),
            _lists(keeps, pa.bool_()),
            _lists([s.weight for s in selected], pa.float32()),
            pa.array([len(k) for k in keeps], pa.int32()),
            pa.array([s.targets for s in selected], pa.int32()),
            pa.array([int(k.sum()) for k in keeps], pa.int32()),
            pa.array([step] * len(selected), pa.int32()),
        ],
        schema=arrow_schema("masks"),
    )


def untrained_selections(samples: Sequence[tuple[str, int, int]]) -> list[SampleSelection]:
    """Samples no step trained (sample_id, n_tokens, targets): nothing kept, no score."""
    return [SampleSelection(sample_id, np.full(n, np.nan, np.float32), np.zeros(n, bool), targets, np.zeros(n, np.float32))
            for sample_id, n, targets in samples]
