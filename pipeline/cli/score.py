"""`sstoken score`: per-token scores and keep masks for a tokenized corpus, on Ray."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipeline.core.config import add_config_arguments, config_from_arguments

if TYPE_CHECKING:
    from pipeline.artifacts.stage_output import StageSummary


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.stages.score import ScoreJobConfig

    parser = commands.add_parser(
        "score",
        help="Score a tokenized corpus with a current and a history checkpoint; write score shards and masks.",
        description="Score every shard of a tokenized corpus (per-token NLLs under both checkpoints, attention "
        "importance, combined score, keep mask) into DIR/part-NNNNN.parquet + DIR/manifest.json. Runs on an "
        "embedded local Ray unless --address or RAY_ADDRESS names a cluster; a rerun redoes only what is missing, and "
        "a new --ratio or --granularity only re-selects the keep masks from the stored scores.",
    )
    add_config_arguments(parser, ScoreJobConfig)
    parser.set_defaults(handler=_run)


def format_summary(summary: StageSummary) -> str:
    counts, details = summary.counts, summary.details
    skipped = f", {counts['shards_skipped']} already done" if counts["shards_skipped"] else ""
    rate = f" at {details['tokens_per_s']:,.0f} tokens/s" if counts["tokens_scored"] else ""
    return "\n".join(
        [
            f"scored {counts['samples']:,} samples, {counts['tokens']:,} tokens "
            f"({counts['trainable']:,} trainable) in {counts['shards']} shards{skipped}",
            f"kept {counts['kept']:,} of {counts['trainable']:,} trainable tokens "
            f"({details['kept_ratio']:.1%}, {details['granularity']} selection)",
            f"this run: {counts['tokens_scored']:,} tokens scored{rate}, {summary.timings['total_s']:.1f} s in all",
            *_history_phase_line(summary),
            *_reselected_line(summary),
            *summary.notes,
            f"output: {summary.output}",
        ]
    )


def _history_phase_line(summary: StageSummary) -> list[str]:
    history = summary.details.get("phases", {}).get("history", {})
    if not history.get("shards"):
        return []
    return [f"history NLLs: {history['shards']} shards computed first with the history model alone, then cached"]


def _reselected_line(summary: StageSummary) -> list[str]:
    rewritten = summary.counts["shards_rewritten"]
    if not rewritten:
        return []
    return [f"keep masks re-selected from the stored scores in {rewritten} shards (no model run)"]


def _run(arguments: argparse.Namespace) -> int:
    from pipeline.stages.score import ScoreJobConfig, run_score_job

    summary = run_score_job(config_from_arguments(ScoreJobConfig, arguments))
    print(format_summary(summary))
    return 0
