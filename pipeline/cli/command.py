"""One helper that turns a stage into a subcommand, and the one way a stage's summary is printed.

    register = stage_command("prepare", PrepareConfig, "pipeline.data.prepare_stage:run_prepare", help=..., description=...)

The flags come from the config class, the YAML file and flags fill it, the run function gets it,
and what it returns (a `StageSummary`) is printed as a table. The run function is named as
"module:function" and imported only when the command runs: `sstoken COMMAND --help` then
imports the config class alone (pydantic, no torch, no pyarrow) and answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import numbers
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from pipeline.runtime.config import StageConfig, add_config_arguments, config_from_arguments

if TYPE_CHECKING:
    from pipeline.runtime.stage_output import StageSummary

# Prints what a run returned and gives the exit status (0: all well).
Report = Callable[[Any, Console], int]


def run_function(path: str) -> Callable[[Any], Any]:
    """The function a "module:function" path names."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _label(name: str) -> str:
    return name.replace("_", " ")


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{value:,}"
    return f"{value:,.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def _detail_rows(details: dict[str, Any]) -> list[tuple[str, str]]:
    """Scalar details as rows, a mapping of scalars as one indented row per entry; deeper nesting is left out."""
    rows: list[tuple[str, str]] = []
    for name, value in details.items():
        if isinstance(value, (str, numbers.Number)):
            rows.append((_label(name), _number(value)))
        elif isinstance(value, dict) and all(isinstance(v, (str, numbers.Number)) for v in value.values()):
            rows.extend((f"  {_label(name)}: {key}", _number(v)) for key, v in sorted(value.items()))
    return rows


def _timing_label(name: str) -> str:
    phase = _label(name.removesuffix("_s").removesuffix("seconds")).strip()
    return f"seconds: {phase}" if phase else "seconds"


def summary_table(summary: StageSummary) -> Table:
    """Counts, details and timings of one stage run, one row each."""
    title = f"{summary.stage} → {summary.output}" + (" (up to date, reused)" if summary.reused else "")
    table = Table(title=title)
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [(_label(name), _number(value)) for name, value in summary.counts.items()]
    rows += _detail_rows(summary.details)
    rows += [(_timing_label(name), f"{seconds:,.1f}") for name, seconds in summary.timings.items()]
    for name, value in rows:
        table.add_row(name, value)
    return table


def print_summary(summary: StageSummary, console: Console) -> int:
    """The table, then the notes the user should read (on stderr); exit status 0."""
    console.print(summary_table(summary))
    for note in summary.notes:  # plain lines on stderr: never wrapped, never mixed into the table
        print(f"note: {note}", file=sys.stderr)
    return 0


def stage_command(
    name: str,
    config_class: type[StageConfig],
    run: str,
    *,
    help: str,
    description: str,
    report: Report = print_summary,
    positional: str | None = None,
) -> Callable[[argparse._SubParsersAction], None]:
    """A `register(commands)` that adds subcommand `name`: flags from `config_class`, then `run`, then `report`.

    `positional` names a field that may also be given as the command's one positional argument
    (`sstoken report RUN` as `sstoken report --folder RUN`)."""

    def handle(arguments: argparse.Namespace) -> int:
        config = config_from_arguments(config_class, arguments)
        # Where an OS refusal that names no file happened (pyarrow's writers): `main` says so in its one line.
        arguments.output_folder = getattr(config, "output", None)
        return report(run_function(run)(config), Console())

    def register(commands: argparse._SubParsersAction) -> None:
        parser = commands.add_parser(name, help=help, description=description)
        add_config_arguments(parser, config_class)
        if positional is not None:
            field = config_class.model_fields[positional]
            parser.add_argument(positional, nargs="?", default=argparse.SUPPRESS, metavar=positional.upper(),
                                help=f"{field.description} (as --{positional.replace('_', '-')})")
        parser.set_defaults(handler=handle)

    return register
