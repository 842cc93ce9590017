"""Online selection's settings: which tokens each training step keeps, chosen from the step's own forward.

`sstoken train --selection online` and a run config's `train: {selection: online, online: {...}}` fill this
one model (the `online:` section of `TrainConfig`). It is the select stage's settings (method, ratio, gamma,
normalise, seed: `SelectSettings`, the same fields with the same meaning) plus what only an online step
needs: the history checkpoint whose NLLs the score stage cached, the attention layer, the attention-only
warm-up and the history policy. Free of torch, so configs load fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from pipeline.runtime.config import setting
from pipeline.selection.select_settings import SelectSettings

# What a step has: its own NLLs, importance and entropy, and the history NLLs from the cache. oracle needs
# token labels (an eval yardstick, not a training mode); global granularity needs the whole corpus' scores.
ONLINE_METHODS = ("sstoken", "rel", "attn", "rho1", "tokencleaning", "random", "full", "loss", "confidence", "entropy",
                  "prob", "entropy-gated")
HISTORY_POLICIES = ("base", "previous", "ema")


class OnlineSettings(SelectSettings):
    """How an online training step selects its tokens (the select stage's method settings, per sample)."""

    history: Path | None = setting(
        None, run_key=False,
        description="History checkpoint (rho1: the reference model) whose per-token NLLs the score stage cached "
        "(`sstoken score --history H --history-cache C` over the same --data); needed by the methods over REL with "
        "history_policy base.",
    )
    history_cache: Path | None = setting(
        None, run_key=False,
        description="History NLL cache root the score stage wrote; default: $SSTOKEN_CACHE/history or "
        "~/.cache/sstoken/history (the score stage's default).",
    )
    layer: int = setting(-1, run_key=False, description="Decoder layer whose attention gives importance; negative "
                         "counts from the last.")
    warmup_samples: int = setting(
        0, ge=0, run_key=False,
        description="Attention-only selection (method attn) for the optimizer steps that start within the first N "
        "samples (the authors use 10000); a step counts whole: steps 0 .. ceil(N / batch_size) - 1.",
    )
    history_policy: Literal["base", "previous", "ema"] = setting(
        "base", run_key=False,
        description="Which model the history NLLs are of: base (the --online.history checkpoint, its NLLs cached once "
        "by the score stage; the paper's); previous (the weights history_every steps before the current ones, "
        "refreshed every history_every steps); ema (ema_alpha * history + (1 - ema_alpha) * current every history_every "
        "steps, from the starting weights). previous and ema run a second, no-grad forward per micro-batch.",
    )
    history_every: int = setting(1, ge=1, run_key=False,
                                 description="history_policy previous / ema: steps between history updates (N, K).")
    ema_alpha: float = setting(0.9, gt=0.0, lt=1.0, run_key=False,
                               description="history_policy ema: weight of the past in the weight average.")

    @model_validator(mode="after")
    def _fits_online(self) -> OnlineSettings:
        if self.method not in ONLINE_METHODS:
            raise ValueError(f"method {self.method} cannot select online (it needs token labels); choose one of "
                             f"{', '.join(ONLINE_METHODS)}")
        if self.granularity != "sample":
            raise ValueError("online selection keeps the top ratio of each sample (granularity sample); a global "
                             "selection needs every sample's scores first: score and select offline")
        if self.filters_samples:
            raise ValueError(f"online selection does not take sample_ratio (got {self.sample_ratio}): the sample "
                             "filter's cut is corpus-wide, and a step sees only its own batch; filter offline "
                             "(sstoken select --sample-ratio) and train on its masks")
        if self.min_prob is not None:
            raise ValueError("online selection does not take min_prob: a step must know how many tokens it keeps "
                             "before its forward (the loss is normalised by the global batch's kept count)")
        if self.history_policy != "base":
            if self.method in ("rho1", "tokencleaning"):
                raise ValueError(f"method {self.method} ranks against a fixed reference model: history_policy base, "
                                 f"not {self.history_policy}")
            if self.history is not None:
                raise ValueError(f"history_policy {self.history_policy} takes its history from the weights being "
                                 "trained: pass no online.history (it is the base policy's checkpoint)")
        return self

    @property
    def moving_history(self) -> bool:
        """REL against the weights being trained (previous, ema), not a cached checkpoint."""
        return self.uses_rel and self.history_policy != "base"

    def select_settings(self) -> SelectSettings:
        """The selection these settings make (what the select stage would be given)."""
        return SelectSettings(**{name: getattr(self, name) for name in SelectSettings.model_fields})

    def warmup_steps(self, batch_size: int) -> int:
        """Optimizer steps selected attention-only: those whose first sample falls within warmup_samples."""
        return -(-self.warmup_samples // batch_size)

    @property
    def excess(self) -> str:
        """The REL direction the method ranks (rho1: current - history; the others history - current)."""
        return "current_minus_history" if self.method == "rho1" else "history_minus_current"
