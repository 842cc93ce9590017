"""`sstoken select`: keep masks from the signals a scores folder stores, by any method; no model runs."""

from __future__ import annotations

from pipeline.cli.command import stage_command
from pipeline.selection.select_config import SelectConfig

register = stage_command(
    "select",
    SelectConfig,
    "pipeline.selection.select_stage:run_select",
    help="Re-select the keep masks of a scores folder by another method, ratio or granularity (no model run).",
    description="Recompute the score, keep, weight and n_kept columns of every shard of a scores folder (made by "
    "`sstoken score`) from its stored signals (nll_cur, nll_hist, rel, attn, entropy_cur), in place, and update its "
    "manifest. The result equals a fresh `sstoken score` with these settings. With --output DIR the selection "
    "goes to a masks folder instead (mask shards named as the score shards, a manifest of kind masks) and the "
    "scores folder is left untouched. Methods: sstoken, rel, attn, full, random, tokencleaning, rho1, oracle, loss, "
    "confidence, entropy; weighted (each kept token's loss weight is its score): prob, entropy-gated (see "
    "docs/method.md and the README). With --sample-ratio R the selection is two-level: the share R of samples with "
    "the highest mean --sample-by stays, the rest are dropped whole, then tokens are selected within the samples "
    "that stay.",
)
