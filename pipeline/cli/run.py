"""`sstoken run CONFIG`: rounds of score -> select -> train in one run folder, then a table of the rounds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.table import Table

from pipeline.cli.command import stage_command
from pipeline.loop.run_config import RunConfig

if TYPE_CHECKING:
    from pipeline.loop.rounds import RunResult
    from pipeline.loop.run_folder import RunRecord


def _figure(value: Any, digits: str = ".4g") -> str:
    return "-" if value is None else format(value, digits)


def rounds_table(record: RunRecord, root: Path) -> Table:
    """One row per round: its samples, selection, kept ratio, train loss, and the seconds of scoring and training
    (select's, a second or less, are in run.json). Narrow enough for an 80-column terminal."""
    table = Table(title=f"run → {root}", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True, caption="kept: share of trainable tokens kept; "
                  "loss: mean train loss of the round's optimizer steps; seconds of each stage in run.json")
    for column in ("round", "samples", "selection", "kept", "loss", "score s", "train s", "score/train"):
        table.add_column(column, justify="left" if column == "selection" else "right", no_wrap=True)
    for entry in record.rounds:
        summary = entry.summary
        selection = (entry.selection.method if entry.selection else "?") + (" warm-up" if entry.warmup else "")
        table.add_row(
            f"r{entry.round:03d}", f"{entry.samples:,}", selection,
            *(_figure(getattr(summary, name) if summary else None, digits) for name, digits in (
                ("kept_ratio", ".3f"), ("train_loss", ".3f"), ("score_s", ".1f"), ("train_s", ".1f"),
                ("rescore_to_train", ".2f"))),
        )
    return table


def artifacts_note(result: RunResult) -> str:
    """Where the run's record and its last checkpoint are."""
    last = result.record.rounds[-1]
    return f"run record: {result.folder.record}\nlast checkpoint: {result.folder.inside(last.checkpoint, 'a checkpoint')}"


def report(result: RunResult, console: Console) -> int:
    console.print(rounds_table(result.record, result.folder.root))
    console.print(artifacts_note(result), soft_wrap=True)
    return 0


_register = stage_command(
    "run",
    RunConfig,
    "pipeline.loop.rounds:run_loop",
    help="Rounds of score -> select -> train in one run folder (the self-modulated loop).",
    description="Prepare the corpus (once), then rounds of score -> select -> train; each round's checkpoint is the "
    "next round's current model. A round is a slice of the corpus (default) or an epoch. A killed run resumes "
    "when run again. CONFIG is a YAML file with the run's settings and its prepare:, score:, select: and train: "
    "sections (see jobs/configs/run.example.yaml); flags override it.",
    report=report,
)


class _ConfigFile(argparse.Action):
    """The positional CONFIG fills `--config`'s setting (argparse calls it with None when CONFIG is absent)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001 - argparse's signature
        if values is not None:
            namespace.config = values


def register(commands: argparse._SubParsersAction) -> None:
    """`sstoken run [CONFIG] [--flags]`: CONFIG is the same file `--config` names."""
    _register(commands)
    parser = commands.choices["run"]
    parser.add_argument("run_config", nargs="?", type=Path, action=_ConfigFile, metavar="CONFIG",
                        help="YAML file with the run's settings (as --config).")
