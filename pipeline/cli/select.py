"""`sstoken select`: keep masks from the signals a scores folder stores, by any method; no model runs."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from pipeline.core.config import add_config_arguments, config_from_arguments

if TYPE_CHECKING:
    from pipeline.artifacts.stage_output import StageSummary


def register(commands: argparse._SubParsersAction) -> None:
    from pipeline.stages.configs import SelectConfig

    parser = commands.add_parser(
        "select",
        help="Re-select the keep masks of a scores folder by another method, ratio or granularity (no model run).",
        description="Recompute the score, keep and n_kept columns of every shard of a scores folder (made by "
        "`sstoken score`) from its stored signals (nll_cur, nll_hist, rel, attn), in place, and update its "
        "manifest. The result equals a fresh `sstoken score` with these settings. Methods: sstoken, rel, attn, "
        "full, random, tokencleaning (see docs/method.md).",
    )
    add_config_arguments(parser, SelectConfig)
    parser.set_defaults(handler=_run)


def format_summary(summary: StageSummary) -> str:
    counts, selection = summary.counts, summary.details["selection"]
    settings = ", ".join(f"{k} {v}" for k, v in selection.items() if k in ("gamma", "normalise", "seed"))
    return "\n".join(
        [
            f"selected with {selection['method']} ({selection['granularity']}, ratio {selection['ratio']}"
            f"{', ' + settings if settings else ''}): kept {counts['kept']:,} of {counts['trainable']:,} trainable "
            f"tokens ({counts['kept_ratio']:.1%})",
            f"{counts['shards_rewritten']} of {counts['shards']} shards rewritten, {summary.timings['total_s']:.1f} s",
            *summary.notes,
            f"output: {summary.output}",
        ]
    )


def _run(arguments: argparse.Namespace) -> int:
    from pipeline.stages.configs import SelectConfig
    from pipeline.stages.select import run_select

    print(format_summary(run_select(config_from_arguments(SelectConfig, arguments))))
    return 0
