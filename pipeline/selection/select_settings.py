"""How tokens are selected from stored signals: the select stage's settings, free of torch and numpy.

`sstoken select`, `sstoken score` and a run config's `select:` section all fill this one model.
What each method does with it is in `pipeline.selection.methods`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import model_validator

from pipeline.runtime.config import StageConfig, setting
from pipeline.runtime.fingerprint import sha256_file

Method = Literal[
    "sstoken", "rel", "attn", "full", "random", "tokencleaning", "rho1", "oracle", "loss", "confidence", "entropy",
    "prob", "entropy-gated",
]
Normalise = Literal["per_sample", "none"]

# Methods that rank by REL alone: with no REL signal (same checkpoint, or REL below the floor
# everywhere) every score ties and the position tie-break would keep the first tokens of each response.
# sstoken joins them at gamma 1.
REL_ONLY_METHODS = ("rel", "tokencleaning", "rho1")
# Methods that rank raw REL (nats), never normalised: the baselines as their authors define them.
RAW_REL_METHODS = ("tokencleaning", "rho1")
# Methods that rank one stored signal of the current model as it is (no history, no attention), and that signal.
CURRENT_SIGNAL_METHODS = {"loss": "nll_cur", "confidence": "nll_cur", "entropy": "entropy_cur", "prob": "nll_cur",
                          "entropy-gated": "entropy_cur"}
# Weighted methods: the score they rank is each kept token's loss weight (masks' `weight`), not 1.
WEIGHTED_METHODS = ("prob", "entropy-gated")
# The sample filter's roll-ups (`sample_by`): each sample's mean over its targets of the stored column named here
# (score: the method's own score, computed, not stored); the samples with the lowest means are dropped.
SAMPLE_ROLLUPS = {"score": None, "rel": "rel", "entropy": "entropy_cur", "loss": "nll_cur"}
SampleBy = Literal["score", "rel", "entropy", "loss"]


class SelectSettings(StageConfig):
    """Which trainable tokens to keep, from the signals a score stage stored.

    None of these is part of the score stage's run key: the signals do not depend on them (which
    signals are computed does; the score stage keys that itself), so a new value only re-selects.
    """

    method: Method = setting(
        "sstoken",
        description="sstoken: gamma * REL_n + (1 - gamma) * attn; rel: REL_n only (gamma 1); attn: attention only "
        "(gamma 0); full: every trainable token; random: ratio of them at random (seeded); tokencleaning: raw REL "
        "(history - current), top floor(ratio * n); rho1: raw REL stored with --excess current_minus_history "
        "(Rho-1's loss(current) - loss(reference), history = the reference), top ceil(ratio * n); oracle: a yardstick "
        "that knows the bad tokens (--labels): drops them first, then at random (seeded as random); loss: the highest "
        "nll_cur (the current model's hardest tokens); confidence: the lowest nll_cur (its most probable tokens, "
        "ProFit), optionally only those with probability >= --min-prob; entropy: the highest entropy_cur (its most "
        "uncertain predictions); weighted (each kept token's loss weight is its score): prob: weight exp(-nll_cur), the "
        "current model's probability of the target (DFT), top ratio by it; entropy-gated: weight entropy_cur / ln|V| "
        "in [0, 1] (EAFT), top ratio by it.",
        run_key=False,
    )
    gamma: float = setting(
        0.5, ge=0.0, le=1.0, run_key=False,
        description="sstoken only: weight of the normalised excess loss; 1 - gamma weighs attention.",
    )
    ratio: float = setting(
        0.6, gt=0.0, le=1.0, run_key=False,
        description="Fraction of trainable tokens to keep (ceil; floor for tokencleaning; full: 1).",
    )
    granularity: Literal["sample", "global"] = setting(
        "sample", run_key=False,
        description="Keep the top ratio of each sample's trainable tokens, or of the whole corpus.",
    )
    normalise: Literal["auto", "per_sample", "none"] = setting(
        "auto", run_key=False,
        description="How REL is scaled before ranking: per_sample min-max (the paper) or none (raw nats); "
        "auto: none for tokencleaning and rho1, per_sample otherwise. See docs/method.md for global granularity.",
    )
    min_prob: float | None = setting(
        None, gt=0.0, le=1.0, run_key=False,
        description="confidence only: keep only targets with exp(-nll_cur) >= min_prob, within the ratio's top count "
        "(the ratio caps, the threshold drops: ratio 1 keeps exactly the targets at or above the threshold).",
    )
    sample_ratio: float = setting(
        1.0, gt=0.0, le=1.0, run_key=False,
        description="Share of samples to KEEP before any token is selected (ceil): the samples with the highest mean "
        "--sample-by over their targets stay (ties to the smaller sample id), the rest are dropped whole (keep false, "
        "weight 0); tokens are then selected by the method within the kept samples (ratio of their targets). "
        "1: every sample stays (no sample filter).",
    )
    sample_by: SampleBy = setting(
        "score", run_key=False,
        description="With sample_ratio < 1, each sample's mean over its targets that ranks it (the lowest are dropped): "
        "score: the method's token score; rel: stored REL (nats, in its --excess direction); entropy: entropy_cur "
        "(the least uncertain samples go); loss: nll_cur (the easiest samples go).",
    )
    seed: int = setting(
        0, ge=0, run_key=False, description="random, oracle: seed; each sample's draw depends on (seed, sample_id)."
    )
    labels: Path | None = setting(
        None, run_key=False,
        description="oracle only: a token labels file (schemas/token_labels.v1.json: sample_id, drop) flagging the "
        "known-bad tokens of every sample (`sstoken eval` writes one from its ground-truth task).",
    )

    @model_validator(mode="after")
    def _normalise_fits_method(self) -> SelectSettings:
        if self.method in RAW_REL_METHODS and self.normalise == "per_sample":
            raise ValueError(
                f"method {self.method} ranks raw REL without normalisation; use --method rel --normalise per_sample "
                "for normalised REL"
            )
        if self.min_prob is not None and self.method != "confidence":
            raise ValueError(f"min_prob is for method confidence only, not method {self.method}")
        if self.sample_by != "score" and not self.filters_samples:
            raise ValueError(f"sample_by {self.sample_by} ranks samples for the sample filter; set sample_ratio below 1 "
                             "(the share of samples to keep) or leave sample_by out")
        if self.filters_samples and self.sample_by == "score" and self.method == "full":
            raise ValueError("method full scores every target 1, so its mean score ranks no sample; filter samples "
                             "by another roll-up (sample_by rel, entropy or loss)")
        if (self.method == "oracle") != (self.labels is not None):
            raise ValueError("method oracle needs labels (a token labels file), and labels are for method oracle only")
        return self

    @property
    def rel_weight(self) -> float:
        """Weight of the REL term in the score: gamma for sstoken, 1 for the REL-only methods, else 0."""
        if self.method == "sstoken":
            return self.gamma
        return 1.0 if self.method in REL_ONLY_METHODS else 0.0

    @property
    def uses_rel(self) -> bool:
        return self.rel_weight > 0.0

    @property
    def uses_attention(self) -> bool:
        return self.method == "attn" or (self.method == "sstoken" and self.gamma < 1.0)

    @property
    def uses_entropy(self) -> bool:
        return self.ranked_signal == "entropy_cur" or self.sample_rollup_column == "entropy_cur"

    @property
    def needs_rel(self) -> bool:
        """True when REL decides something: the score, or the sample filter (sample_by rel)."""
        return self.uses_rel or self.sample_rollup_column == "rel"

    @property
    def filters_samples(self) -> bool:
        """True when whole samples are dropped before tokens are selected (sample_ratio < 1)."""
        return self.sample_ratio < 1.0

    @property
    def sample_rollup_column(self) -> str | None:
        """The stored column the sample filter averages (None: no filter, or the method's score)."""
        return SAMPLE_ROLLUPS[self.sample_by] if self.filters_samples else None

    def within_shard(self) -> SelectSettings:
        """What one shard selects alone, before the corpus is seen: per sample, no sample filter (the score stage's
        per-shard pass; the select step then applies the corpus-wide parts)."""
        return self.model_copy(update={"granularity": "sample", "sample_ratio": 1.0, "sample_by": "score"})

    @property
    def weighted(self) -> bool:
        """The method weights each kept token by its score (prob, entropy-gated); the others weigh it 1."""
        return self.method in WEIGHTED_METHODS

    @property
    def ranked_signal(self) -> str | None:
        """The stored column a current-signal method ranks (loss, confidence: nll_cur; entropy: entropy_cur)."""
        return CURRENT_SIGNAL_METHODS.get(self.method)

    @property
    def rel_only(self) -> bool:
        """True when REL alone decides the ranking (REL-only methods, sstoken at gamma 1)."""
        return self.rel_weight == 1.0

    @property
    def rel_normalisation(self) -> Normalise | None:
        """The normalisation REL gets (None when REL plays no part)."""
        if not self.uses_rel:
            return None
        if self.normalise != "auto":
            return self.normalise
        return "none" if self.method in RAW_REL_METHODS else "per_sample"

    @property
    def keep_ratio(self) -> float:
        return 1.0 if self.method == "full" else self.ratio

    def selection_key(self) -> dict[str, Any]:
        """The settings that decide the keep masks, canonical: what manifests and shard records carry.

        Settings a method ignores are left out (gamma for rel, seed for sstoken, ...), so two
        settings that select the same tokens have the same key.
        """
        key: dict[str, Any] = {"method": self.method, "ratio": self.keep_ratio, "granularity": self.granularity}
        if self.method == "sstoken":
            key["gamma"] = self.gamma
        if self.uses_rel:
            key["normalise"] = self.rel_normalisation
        if self.method in ("random", "oracle"):
            key["seed"] = self.seed
        if self.min_prob is not None:
            key["min_prob"] = self.min_prob
        if self.filters_samples:
            key |= {"sample_ratio": self.sample_ratio, "sample_by": self.sample_by}
        if self.labels is not None:
            # The labels decide the masks: their content, not only their path, is part of the key.
            key["labels"] = sha256_file(self.labels) if Path(self.labels).is_file() else f"missing: {self.labels}"
        return key
