"""`sstoken score`: per-token signals, scores and keep masks for a tokenized corpus, on Ray."""

from __future__ import annotations

from pipeline.cli.command import stage_command
from pipeline.scoring.score_config import ScoreJobConfig

register = stage_command(
    "score",
    ScoreJobConfig,
    "pipeline.scoring.score_stage:run_score_job",
    help="Score a tokenized corpus with a current and a history checkpoint; write score shards and masks.",
    description="Score every shard of a tokenized corpus (per-token NLLs under both checkpoints, attention "
    "importance, combined score, keep mask) into DIR/part-NNNNN.parquet + DIR/manifest.json. Runs on an "
    "embedded local Ray unless --ray.address or RAY_ADDRESS names a cluster; a rerun redoes only what is missing, and "
    "a new --method, --ratio or --granularity only re-selects the keep masks from the stored signals.",
)
