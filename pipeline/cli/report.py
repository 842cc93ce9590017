"""`sstoken report DIR --output report.html`: one self-contained page about a run, a scores or masks folder, or an eval."""

from __future__ import annotations

from pipeline.cli.command import stage_command
from pipeline.views.report_config import ReportConfig

register = stage_command(
    "report",
    ReportConfig,
    "pipeline.views.report:run_report",
    help="Write one self-contained HTML page about a run, a scores or masks folder, or an eval folder.",
    description="Totals (samples, targets, kept, rejected rows by reason, config and provenance), plots (REL, "
    "attention and score distributions, kept ratio per sample, by position in the response and by source, the "
    "tokens most often dropped and kept), samples as token heatmaps coloured by score (hover a token for its "
    "numbers; a search box by sample id) and, for a run of several rounds, how the masks changed between rounds "
    "and each round's training loss. Given an eval folder (holding eval.json) it renders the eval table, the "
    "selection by round and the eval plot. The page needs no network; it embeds a bounded sample of the samples' "
    "tokens (--embed-tokens), while every figure covers all of them.",
    positional="folder",
)
