"""`sstoken eval CONFIG`: every selection method through the loop over seeds, then the table (eval.json/.md/.svg)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markdown import Markdown

from pipeline.cli.command import stage_command
from pipeline.cli.run import _ConfigFile
from pipeline.eval.config import EvalConfig

if TYPE_CHECKING:
    from pipeline.eval.evaluate import EvalResult


def report(result: EvalResult, console: Console) -> int:
    console.print(Markdown((result.output / "eval.md").read_text()))
    console.print(f"eval folder: {result.output} (eval.json, eval.md, eval.svg); {result.cells_run} cell(s) run now, "
                  f"{result.cells_reused} done earlier", soft_wrap=True)
    return 0


_register = stage_command(
    "eval",
    EvalConfig,
    "pipeline.eval.evaluate:run_eval",
    help="Every selection method through the loop over seeds, each model measured: eval.json, eval.md, eval.svg.",
    description="Run one corpus (the generated ground-truth task, or a natural corpus) through full, random, rel, attn, "
    "sstoken, rho1 and tokencleaning (the last two with a reference trained on a clean 20% slice), each from the same "
    "base with the same seed and the same budget of kept tokens seen, over several seeds; then measure each model "
    "(held-out NLL, exact match, selection quality per round against the known corrupted tokens, seconds of scoring "
    "and training) and write the table. Finished cells are not redone. CONFIG: see jobs/configs/eval.yaml; --scale "
    "multiplies the samples for larger machines.",
    report=report,
)


def register(commands: argparse._SubParsersAction) -> None:
    """`sstoken eval [CONFIG] [--flags]`: CONFIG is the same file `--config` names."""
    _register(commands)
    commands.choices["eval"].add_argument("eval_config", nargs="?", type=Path, action=_ConfigFile, metavar="CONFIG",
                                          help="YAML file with the eval's settings (as --config).")
