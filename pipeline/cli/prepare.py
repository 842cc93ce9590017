"""`sstoken prepare`: a raw corpus becomes tokenized Parquet shards."""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table

from pipeline.core.config import add_config_arguments, config_from_arguments
from pipeline.artifacts.stage_output import StageSummary
from pipeline.stages.prepare import PrepareConfig, run_prepare

# Exit status when the corpus was written but some input gave no valid row.
EXIT_INPUT_WITHOUT_ROWS = 3


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "prepare",
        help="Tokenize a corpus with a chat template into Parquet shards.",
        description="Tokenize a corpus (JSONL, JSON, Parquet, datasets folders) into Parquet shards with "
        "trainable-token masks, a rejected-rows file and a manifest.",
    )
    add_config_arguments(parser, PrepareConfig)
    parser.set_defaults(handler=handle)


def print_summary(summary: StageSummary, console: Console) -> None:
    table = Table(title=f"prepare → {summary.output}" + (" (up to date, reused)" if summary.reused else ""))
    table.add_column("count")
    table.add_column("value", justify="right")
    counts = summary.counts
    for name, value in [
        ("rows read", counts["rows_read"]),
        ("rows written", counts["rows_written"]),
        ("rows rejected", counts["rows_rejected"]),
        *((f"  rejected: {reason}", n) for reason, n in sorted(summary.details["rejected_by_reason"].items())),
        ("shards", counts["shards"]),
        ("tokens", counts["tokens"]),
        ("trainable tokens", counts["trainable_tokens"]),
    ]:
        table.add_row(name, f"{value:,}")
    console.print(table)


def handle(arguments: argparse.Namespace) -> int:
    summary = run_prepare(config_from_arguments(PrepareConfig, arguments))
    print_summary(summary, Console(stderr=True))
    if summary.details["inputs_without_rows"]:
        print(
            "sstoken prepare: these inputs gave no valid row: " + "; ".join(summary.details["inputs_without_rows"]),
            file=sys.stderr,
        )
        return EXIT_INPUT_WITHOUT_ROWS
    return 0
