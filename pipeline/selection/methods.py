"""Selection methods: one sample's stored signals -> its per-token score, and the guards around REL.

Pure functions of numpy arrays (full length, NaN / False off the targets), so the score stage,
the select stage and the tests share one definition of every method:

    sstoken        gamma * REL_n + (1 - gamma) * attn           (REL_n: REL normalised as configured)
    rel            REL_n                                        (sstoken at gamma 1)
    attn           attn                                         (sstoken at gamma 0)
    tokencleaning  REL, raw (history - current: loss(base) - loss(reference) with current = reference)
    rho1           REL, raw (current - history: loss(current) - loss(reference) with history = reference)
    full           1 at every target                            (keeps them all)
    random         uniform [0, 1) per target, from (seed, sample_id)
    oracle         random's draw, plus 1 at every target the token labels do not flag (`drop`): the known-bad
                   tokens rank below every other, so they are dropped first, the rest at random
    loss           nll_cur                                      (the current model's hardest tokens first)
    confidence     -nll_cur = log P_cur(x_i | x_<i)             (its most probable tokens first, ProFit);
                   with min_prob P, a kept target must also have P_cur >= P (`limited_keep`): the ratio
                   caps the count, the threshold drops the improbable ones from it
    entropy        entropy_cur                                  (its most uncertain predictions first)

Weighted methods: the score is also the loss weight of each kept token (`selection_weight`; masks' `weight`,
trained as sum(w * nll) / sum(w)), 0 elsewhere; a target whose weight is 0 is not kept (`limited_keep`):

    prob           exp(-nll_cur) = P_cur(x_i | x_<i)            (DFT, arXiv 2508.05629: the probable first,
                                                                 each weighted by its probability)
    entropy-gated  entropy_cur / ln|V|, in [0, 1]               (EAFT, arXiv 2601.02151: the uncertain first; a
                                                                 confident prediction, right or wrong, barely trains)

A score of NaN never reaches the ranking at a target: a signal a method needs that is NaN at a target
is refused, naming the column, the sample, the position and what it points to (`nan_at_targets`: not
computed with `--signals needed`, a checkpoint that gives NaN losses, or a damaged shard), and so is
a baseline over REL stored in the other direction (`excess_refusal`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from pipeline.runtime.errors import UserError
from pipeline.selection.select_settings import SelectSettings
from pipeline.selection.selection import combine, keep_count, minmax_normalise, top_k_mask

# |REL| below this at every target of the corpus is numerical noise, not a signal (nats). A re-saved
# copy of a checkpoint gives ~1e-7 in float32; a single optimiser step of SFT moves NLLs by far
# more than 1e-4 on some token of any real corpus.
REL_FLOOR = 1e-4


@dataclass(frozen=True)
class RelStats:
    """What the guards need to know about REL over the corpus: targets, the largest |REL|, targets without REL
    and, when some are, what is NaN where in the first sample that has one (`nan_at_targets`)."""

    targets: int = 0
    abs_max: float = 0.0
    missing: int = 0
    first_missing: str = ""

    @classmethod
    def of(cls, rel: np.ndarray, trainable: np.ndarray, first_missing: str = "") -> RelStats:
        values = np.asarray(rel, dtype=np.float64)[np.asarray(trainable, dtype=bool)]
        finite = values[~np.isnan(values)]
        missing = int(len(values) - len(finite))
        return cls(int(len(values)), float(np.abs(finite).max()) if len(finite) else 0.0, missing,
                   first_missing if missing else "")

    def merge(self, other: RelStats) -> RelStats:
        return RelStats(self.targets + other.targets, max(self.abs_max, other.abs_max), self.missing + other.missing,
                        self.first_missing or other.first_missing)

    @property
    def is_noise(self) -> bool:
        """Every target's |REL| is below REL_FLOOR (and there is at least one target)."""
        return self.targets > 0 and self.abs_max < REL_FLOOR


def same_checkpoint_refusal(settings: SelectSettings) -> None:
    """Refuse a REL-only selection when current and history are one checkpoint (REL is 0 everywhere)."""
    if settings.rel_only:
        raise UserError(
            f"method {settings.method}{' with gamma 1' if settings.method == 'sstoken' else ''} ranks by REL alone, "
            "but current and history are the same checkpoint: every REL is 0, every score would tie, and the "
            "position tie-break would keep the first ceil(ratio * n) tokens of each response. Pass a history "
            "checkpoint that differs (e.g. the base model), or use gamma < 1 (attention decides) or --method attn"
        )


# The direction of the stored REL (`sstoken score --excess`) a baseline is defined on.
REQUIRED_EXCESS = {"tokencleaning": "history_minus_current", "rho1": "current_minus_history"}


def excess_refusal(settings: SelectSettings, excess: str, source: str) -> None:
    """Refuse a baseline whose excess loss is the opposite of the REL `source` stores (`excess`):
    ranking it would keep exactly the tokens the method means to drop."""
    required = REQUIRED_EXCESS.get(settings.method)
    if required is None or excess == required:
        return
    roles = {
        "rho1": "current = the model being trained, --history = the reference model",
        "tokencleaning": "current = the newer reference model, --history = the base model",
    }[settings.method]
    raise UserError(
        f"method {settings.method} ranks REL = {required.replace('_minus_', ' - ')} ({roles}), but {source} stores "
        f"REL as {excess.replace('_minus_', ' - ')}; rescore with `sstoken score --excess {required}`"
    )


def rel_guard(settings: SelectSettings, stats: RelStats) -> list[str]:
    """The warnings a selection over REL with these corpus statistics carries; refuses a REL-only one.

    REL below REL_FLOOR at every target is treated as zero (see `sample_score`): for sstoken with
    0 < gamma < 1 attention then decides alone, which is worth a warning, not an error.
    """
    if not settings.uses_rel:
        return []
    if stats.missing:
        found = stats.first_missing or (
            "the scores hold no REL (made with --signals needed and a method without REL: rescore with --signals all), "
            "or a checkpoint gives NaN losses"
        )
        raise UserError(
            f"method {settings.method} needs REL, but {stats.missing} of {stats.targets} targets have none: {found}"
        )
    if not stats.is_noise:
        return []
    finding = (
        f"every trainable token has |REL| < {REL_FLOOR:g} nats (largest {stats.abs_max:.3g}): the history and "
        "current checkpoints give the same losses (a re-saved copy?), so REL is noise and is treated as 0"
    )
    if settings.rel_only:
        raise UserError(
            f"{finding}; method {settings.method} ranks by REL alone and would keep the first tokens of each "
            "response by tie-break. Use a history checkpoint that differs, or gamma < 1 / --method attn"
        )
    return [f"{finding}; selection is attention-only"]


def sample_seed(seed: int, sample_id: str) -> np.random.Generator:
    """The random method's generator for one sample: depends on (seed, sample_id) only, not on shards."""
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def _nan_at(values: np.ndarray | None, position: int) -> bool | None:
    return None if values is None else bool(np.isnan(values[position]))


def limited_keep(keep: np.ndarray, score: np.ndarray, settings: SelectSettings) -> np.ndarray:
    """`keep` less the targets a method's limit drops after the top-k: below confidence's probability threshold
    (exp(-nll_cur) >= min_prob, compared as log P = score >= ln(min_prob) in float64, so no exp underflows), or
    of weight 0 for a weighted method (a probability that underflows float32, an entropy of 0: nothing to train)."""
    if settings.weighted:
        return keep & (np.asarray(score, dtype=np.float32) > 0)
    if settings.min_prob is None:
        return keep
    return keep & (np.asarray(score, dtype=np.float64) >= math.log(settings.min_prob))


def selection_weight(score: np.ndarray, keep: np.ndarray, settings: SelectSettings) -> np.ndarray | None:
    """The per-token loss weights of a weighted method: its score at the kept tokens, 0 elsewhere (float32);
    None for a binary method (its weight is keep: 1 on every kept token)."""
    if not settings.weighted:
        return None
    return np.where(keep, np.asarray(score, dtype=np.float32), np.float32(0.0)).astype(np.float32)


def target_probability(nll: np.ndarray) -> np.ndarray:
    """prob's weight: P = exp(-nll), computed in float64, stored float32 (a probability below ~1e-45 is 0)."""
    return np.exp(-np.asarray(nll, dtype=np.float64)).astype(np.float32)


def normalised_entropy(entropy: np.ndarray, vocab_size: int) -> np.ndarray:
    """entropy-gated's weight: H / ln|V|, the entropy over its maximum (a uniform prediction over the |V| entries
    of the output head), clipped to [0, 1] against float32 rounding of a near-one-hot or near-uniform row."""
    scaled = np.asarray(entropy, dtype=np.float64) / math.log(vocab_size)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def nan_at_targets(
    signal: str, sample_id: str, values: np.ndarray, trainable: np.ndarray,
    nll_cur: np.ndarray | None = None, nll_hist: np.ndarray | None = None,
) -> str:
    """What is NaN where in one sample (the column, how many targets, the first position) and what that points to.

    A signal the score stage did not compute (`--signals needed`) is NaN at every target while the model's
    NLLs are there; a checkpoint that gives NaN losses leaves nll_cur (or nll_hist) NaN as well; a NaN among
    finite neighbours was computed and then damaged. With the NLLs unknown, both first causes are named."""
    trainable = np.asarray(trainable, dtype=bool)
    bad = np.flatnonzero(trainable & np.isnan(np.asarray(values, dtype=np.float64)))
    count, targets, first = len(bad), int(trainable.sum()), int(bad[0])
    where = f"sample {sample_id!r}: {signal} is NaN at {count} of {targets} targets (first at position {first})"
    every = count == targets
    if signal == "nll_cur":
        return (f"{where}: the current checkpoint gives NaN losses (NaN or infinite weights?), or the shard was "
                "edited or damaged: check it, then score again")
    if _nan_at(nll_cur, first):
        return (f"{where}; nll_cur is NaN there too: the current checkpoint gives NaN losses (NaN or infinite "
                "weights?): check it, then score again")
    if signal == "rel" and _nan_at(nll_hist, first):
        if every and bool(np.isnan(np.asarray(nll_hist, dtype=np.float64)[trainable]).all()):
            return (f"{where}; nll_hist is NaN at every target too: the scores hold no REL (made with --signals needed "
                    "and a method without REL: rescore with --signals all), or the history checkpoint gives NaN losses")
        return f"{where}; nll_hist is NaN there too: the history checkpoint gives NaN losses: check it, then score again"
    computed = nll_cur is not None and (signal != "rel" or nll_hist is not None)
    if computed and (signal == "rel" or not every):
        return (f"{where}; the model's NLLs are finite there, so {signal} was computed: the shard was edited or "
                "damaged: score again")
    if every:
        return (f"{where}; the scores hold no {signal} (made with --signals needed and a method without it: rescore with "
                "--signals all)" + ("" if computed else ", or a checkpoint gives NaN losses"))
    return (f"{where}; the other targets have it, so it was computed: the shard was edited or damaged, or the model "
            "gave NaN there: score again")


def _needed(
    values: np.ndarray, trainable: np.ndarray, signal: str, sample_id: str,
    nll_cur: np.ndarray | None = None, nll_hist: np.ndarray | None = None,
) -> np.ndarray:
    if np.isnan(values[trainable]).any():
        found = nan_at_targets(signal, sample_id, values, trainable, nll_cur, nll_hist)
        raise UserError(f"the selection needs {signal} at every target: {found}")
    return values


def _rel_term(
    rel: np.ndarray, trainable: np.ndarray, settings: SelectSettings, sample_id: str, noise: bool,
    nll_cur: np.ndarray | None = None, nll_hist: np.ndarray | None = None,
) -> np.ndarray:
    rel = _needed(np.asarray(rel, dtype=np.float32), trainable, "rel", sample_id, nll_cur, nll_hist)
    if noise:
        rel = np.where(trainable, np.float32(0.0), np.float32(np.nan)).astype(np.float32)
    if settings.rel_normalisation == "none":
        return np.where(trainable, rel, np.float32(np.nan)).astype(np.float32)
    return minmax_normalise(rel, trainable)


def sample_score(
    sample_id: str,
    rel: np.ndarray,
    attn: np.ndarray,
    trainable: np.ndarray,
    settings: SelectSettings,
    rel_is_noise: bool = False,
    drop: np.ndarray | None = None,
    nll_cur: np.ndarray | None = None,
    nll_hist: np.ndarray | None = None,
    entropy_cur: np.ndarray | None = None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """One sample's float32 score (NaN off the targets) under `settings.method`.

    `rel_is_noise` is the corpus-wide finding of `rel_guard`: REL then counts as 0 at every target.
    `drop`: oracle only, the sample's known-bad tokens (`pipeline.selection.token_labels.sample_drop`).
    `nll_cur`, `nll_hist`: the sample's NLLs, when at hand: what loss and confidence rank, and for the other
    methods what says why a needed signal is NaN. `entropy_cur`: what entropy and entropy-gated rank;
    `vocab_size`: |V| of the model that scored it (entropy-gated's ln|V|).
    """
    trainable = np.asarray(trainable, dtype=bool)
    method = settings.method
    if settings.ranked_signal is not None:
        return _current_signal_score(sample_id, trainable, settings, nll_cur, nll_hist, entropy_cur, vocab_size)
    if method == "full":
        return np.where(trainable, np.float32(1.0), np.float32(np.nan)).astype(np.float32)
    if method in ("random", "oracle"):
        out = np.full(len(trainable), np.nan, dtype=np.float32)
        out[trainable] = sample_seed(settings.seed, sample_id).random(int(trainable.sum()), dtype=np.float32)
        if method == "oracle":
            if drop is None:
                raise UserError(f"sample {sample_id!r}: the oracle selection needs its token labels; this is a bug")
            # Clean targets score in [1, 2), known-bad ones in [0, 1): bad first out, then random.
            out[trainable & ~drop] += np.float32(1.0)
        return out
    attention = None
    if settings.uses_attention:
        attention = _needed(np.asarray(attn, dtype=np.float32), trainable, "attn", sample_id, nll_cur, nll_hist)
    rel_term = (_rel_term(rel, trainable, settings, sample_id, rel_is_noise, nll_cur, nll_hist)
                if settings.uses_rel else None)
    if attention is None:
        return rel_term
    if rel_term is None:
        return np.where(trainable, attention, np.float32(np.nan)).astype(np.float32)
    return combine(rel_term, attention, settings.gamma)


def _current_signal_score(
    sample_id: str, trainable: np.ndarray, settings: SelectSettings,
    nll_cur: np.ndarray | None, nll_hist: np.ndarray | None, entropy_cur: np.ndarray | None,
    vocab_size: int | None = None,
) -> np.ndarray:
    """loss, confidence, entropy: the ranked column as it is (confidence: negated, so the probable rank first);
    prob, entropy-gated: their weight (`target_probability`, `normalised_entropy`)."""
    signal = settings.ranked_signal
    values = nll_cur if signal == "nll_cur" else entropy_cur
    if values is None:
        raise UserError(f"sample {sample_id!r}: method {settings.method} ranks {signal}, which was not read; this is a bug")
    values = _needed(np.asarray(values, dtype=np.float32), trainable, str(signal), sample_id, nll_cur, nll_hist)
    method = settings.method
    if method == "entropy-gated" and vocab_size is None:
        raise UserError(f"sample {sample_id!r}: method entropy-gated needs the vocabulary size, which was not given; "
                        "this is a bug")
    if method == "confidence":
        # 0 - nll, not -nll: a zero NLL gives +0.0, whose key sorts with the other zeros (-0.0 would sort below them).
        ranked = np.float32(0.0) - values
    elif method == "prob":
        ranked = target_probability(values)
    elif method == "entropy-gated":
        ranked = normalised_entropy(values, int(vocab_size))
    else:
        ranked = values
    return np.where(trainable, ranked, np.float32(np.nan)).astype(np.float32)


def selection_size(settings: SelectSettings, n_trainable: int) -> int:
    """How many of n trainable tokens a selection keeps: ceil(ratio * n); floor for tokencleaning, as
    their code does (`int(n * ratio)`); all for full. rho1 takes ceil: Rho-1's paper says "top k%"
    and its training code is not public, so it rounds like every method without a published rule."""
    if settings.method == "tokencleaning":
        return min(n_trainable, math.floor(round(settings.ratio * n_trainable, 9)))
    return keep_count(settings.keep_ratio, n_trainable)


def sample_keep(score: np.ndarray, trainable: np.ndarray, settings: SelectSettings) -> np.ndarray:
    """The per-sample keep mask: the method's `selection_size` highest scores, ties to the earlier position
    (less what `limited_keep` drops)."""
    keep = top_k_mask(score, trainable, selection_size(settings, int(np.count_nonzero(trainable))))
    return limited_keep(keep, score, settings)
