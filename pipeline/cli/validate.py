"""`sstoken validate DIR`: check artifact folders against their schemas and manifests; exit 4 when a problem is found."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.cli.command import stage_command
from pipeline.validation.validate_config import ValidateConfig

if TYPE_CHECKING:
    from pipeline.runtime.stage_output import StageSummary

# Exit status when validation found a problem (0: every check passed; 2: the path is no artifact folder).
EXIT_PROBLEMS_FOUND = 4


def validation_table(folder: dict) -> Table:
    """One folder's checks, one row each: ok or PROBLEM, and what was checked or what is wrong."""
    table = Table(title=f"{folder['kind']} · {folder['folder']}", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_column("detail", overflow="fold")
    for check in folder["checks"]:
        if check["ok"]:
            table.add_row(check["check"], Text("ok", style="green"), check["detail"])
        for problem in check["problems"]:
            table.add_row(check["check"], Text("PROBLEM", style="bold red"), problem)
    return table


def print_validation(summary: StageSummary, console: Console) -> int:
    """Every folder's table, then one line of totals; the exit status says whether any problem was found."""
    for folder in summary.details["folders"]:
        console.print(validation_table(folder))
    counts = summary.counts
    verdict = "no problem found" if not counts["problems"] else f"{counts['problems']} problem(s) found"
    console.print(f"{counts['folders']} folder(s), {counts['checks']} checks: {verdict}")
    return EXIT_PROBLEMS_FOUND if counts["problems"] else 0


register = stage_command(
    "validate",
    ValidateConfig,
    "pipeline.validation.validate_stage:run_validate",
    help="Check artifact folders against their schemas and manifests (checksums, counts, alignment, joins).",
    description="Check FOLDER (an artifact folder, or every one found under a run folder): the manifest against "
    "manifest.v1, each listed file's checksum and row count, the data fingerprint, each shard against its schema, "
    "the manifest's counts, the alignment contract (lengths equal, position 0 never a target, keep only where "
    "trainable, NaN exactly off the targets), no sample id twice, and that masks join the tokenized data they name "
    "(exports: their inputs unchanged and labels equal to the masks; train outputs: the checkpoint they name). "
    f"Prints a table per folder. Exit status: 0 all checks pass, {EXIT_PROBLEMS_FOUND} a problem was found, 2 FOLDER "
    "is no artifact folder.",
    report=print_validation,
    positional="folder",
)
