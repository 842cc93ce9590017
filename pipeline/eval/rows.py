"""The rows of the eval's table: each a way of training, a selection method with the run settings that make it.

    ROWS["rho1_global"] -> Row(method="rho1", granularity="global", reference=True, ...)

A row is what `methods:` in an eval config lists. Most rows are a selection method as is; the
baselines come twice, as their authors publish them (corpus-wide top-k, `_global`) and per sample
(`_sample`, the granularity ssToken uses), so a difference between them is not the granularity's.

- oracle: the yardstick. It knows the corrupted tokens (the task's token labels) and drops them
  first, then at random, keeping the same number of tokens as every other method; the power gate
  compares it with `full` to say whether this eval can tell methods apart at all.
- full: every trainable token of the same samples in the same optimizer steps (steps-matched);
  full_tokens: every token of a select.ratio share of the samples, each seen once (token-matched,
  fewer steps).
- rho1_*: REL = loss(current) - loss(reference), the reference trained first on clean problems
  disjoint from the training set.
- tokencleaning_*: the authors' self-evolving form: slice k is scored by the base model against the
  model trained on slices < k, and slice 0 (where the two are one model) is trained on every token,
  as their script does.
- sstoken (history base) and sstoken_ema (history an EMA of the weights), rel and attn: round 0 (the
  warm-up slice, where REL is 0) is trained on the attention-only selection, as the paper starts.
- sstoken_online: the same method selected online (`sstoken train --selection online`): one continuous training
  over the cell's samples, each step scored by the live model in its own forward, the history the base model's
  cached NLLs, attention only over as many samples as the offline warm-up slice holds. Its selection measures pool
  the steps after that warm-up, as the offline rows pool the slices after slice 0.
- loss, confidence, entropy (binary) and prob, entropy-gated (weighted: each kept token trained with its weight,
  sum(w nll) / sum(w)): the current model's own signals, no history, no warm-up.
- NAME_global: the row NAME over the whole corpus (exact top-k of every round's targets), for every row of the
  eval's granularity but full and sstoken_ema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.selection.select_settings import Method

Granularity = Literal["sample", "global"]


@dataclass(frozen=True)
class Row:
    """One row: the selection method, and what its cells set besides the eval's own sections."""

    name: str
    method: Method  # the selection method
    about: str
    granularity: Granularity | None = None  # None: the eval's select.granularity
    history: Literal["base", "ema"] = "base"
    warmup: Literal["attn", "full"] = "attn"
    reference: bool = False  # trains against the seed's reference model (rho1)
    token_matched: bool = False  # trains on ceil(select.ratio * n) of the samples (full_tokens)
    needs_labels: bool = False  # knows the ground truth: only on a corpus with labels (the task)
    online: bool = False  # each training step selects in its own forward (train.selection online), one round


# The rows of the paper's comparison: the yardsticks, ssToken and the baselines it was compared with.
PUBLISHED_ROWS: tuple[Row, ...] = (
    Row("oracle", "oracle", "drops the known corrupted tokens first, then at random (the ceiling)", needs_labels=True),
    Row("oracle_global", "oracle", "the oracle over the whole corpus (the ceiling of a global selection)",
        granularity="global", needs_labels=True),
    Row("full", "full", "every trainable token of the same samples, same steps (steps-matched)"),
    Row("full_tokens", "full", "every token of a select.ratio share of the samples, each once (token-matched)",
        token_matched=True),
    Row("random", "random", "select.ratio of each sample's tokens at random"),
    Row("attn", "attn", "attention importance only (ssToken at gamma 0)"),
    Row("rel", "rel", "retrospective excess loss only, history the base (ssToken at gamma 1)"),
    Row("sstoken", "sstoken", "gamma REL_n + (1 - gamma) attention, history the base model"),
    Row("sstoken_ema", "sstoken", "ssToken with an EMA of the weights as history", history="ema"),
    Row("sstoken_online", "sstoken", "ssToken as the paper runs it: each step selects in its own forward, history the "
        "base (cached), attention only over the warm-up slice's samples", online=True),
    Row("rho1_global", "rho1", "Rho-1 excess loss against a reference, corpus-wide top-k (as published)",
        granularity="global", reference=True),
    Row("rho1_sample", "rho1", "Rho-1 excess loss against a reference, top-k per sample", granularity="sample",
        reference=True),
    Row("tokencleaning_global", "tokencleaning", "TokenCleaning self-evolving, corpus-wide top-k (as published)",
        granularity="global", warmup="full"),
    Row("tokencleaning_sample", "tokencleaning", "TokenCleaning self-evolving, top-k per sample",
        granularity="sample", warmup="full"),
)
# The current model's own signals, no history and no attention (binary, then weighted), per sample.
SIGNAL_ROWS: tuple[Row, ...] = (
    Row("loss", "loss", "the current model's highest NLL (its hardest tokens)"),
    Row("confidence", "confidence", "the current model's lowest NLL (its most probable tokens, ProFit)"),
    Row("entropy", "entropy", "the current model's highest predictive entropy (high-entropy minority tokens)"),
    Row("prob", "prob", "weighted: each kept token by the current model's probability of it (DFT), top ratio by it"),
    Row("entropy-gated", "entropy-gated", "weighted: each kept token by its normalised entropy H / ln|V| (EAFT), top "
        "ratio by it"),
)
# Corpus-wide (`NAME_global`): every row of the eval's granularity but full (it keeps every token either way), the
# oracle, the online row (each step selects in its own batch) and the EMA variant (oracle_global is above; the EMA
# changes the history, not the granularity).
GLOBAL_ROWS: tuple[Row, ...] = tuple(
    Row(f"{row.name}_global", row.method, f"{row.about}, corpus-wide top-k", granularity="global", warmup=row.warmup)
    for row in (*PUBLISHED_ROWS, *SIGNAL_ROWS)
    if row.granularity is None and row.method not in ("full", "oracle") and row.history == "base" and not row.online
)
ROWS: dict[str, Row] = {row.name: row for row in (*PUBLISHED_ROWS, *SIGNAL_ROWS, *GLOBAL_ROWS)}
# The default `methods:` of an eval: the published comparison but the variants a decisive run adds when it wants them.
DEFAULT_ROWS: tuple[str, ...] = tuple(
    row.name for row in PUBLISHED_ROWS
    if row.name not in ("oracle_global", "full_tokens", "sstoken_ema", "sstoken_online")
)
# Renamed rows: an old config that lists them gets told the new names.
RENAMED = {"rho1": "rho1_global or rho1_sample", "tokencleaning": "tokencleaning_global or tokencleaning_sample"}
# The power gate compares these two rows (`pipeline.eval.power`).
ORACLE, FULL = "oracle", "full"


def row(name: str) -> Row:
    """The row of that name; an unknown one is one error listing the known rows."""
    if name in ROWS:
        return ROWS[name]
    if name in RENAMED:
        raise ValueError(f"{name} is now two rows: {RENAMED[name]} (corpus-wide top-k as published, or per sample)")
    raise ValueError(f"unknown method {name!r}; the rows are {', '.join(ROWS)}")
