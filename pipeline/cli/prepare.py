"""`sstoken prepare`: a raw corpus becomes tokenized Parquet shards."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console

from pipeline.cli.command import print_summary, stage_command
from pipeline.data.prepare_config import PrepareConfig

if TYPE_CHECKING:
    from pipeline.runtime.stage_output import StageSummary

# Exit status when the corpus was written but some input gave no valid row.
EXIT_INPUT_WITHOUT_ROWS = 3


def report(summary: StageSummary, console: Console) -> int:
    """The summary; exit status 3 when an input gave no valid row (its note says which)."""
    print_summary(summary, console)
    return EXIT_INPUT_WITHOUT_ROWS if summary.details["inputs_without_rows"] else 0


register = stage_command(
    "prepare",
    PrepareConfig,
    "pipeline.data.prepare_stage:run_prepare",
    help="Tokenize a corpus with a chat template into Parquet shards.",
    description="Tokenize a corpus (JSONL, JSON, Parquet, datasets folders) into Parquet shards with "
    "trainable-token masks, a rejected-rows file and a manifest.",
    report=report,
)
