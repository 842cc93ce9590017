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
    console.print(result.report.verdict, soft_wrap=True, markup=False)  # the last word: may the rows be ranked?
    return 0


_register = stage_command(
    "eval",
    EvalConfig,
    "pipeline.eval.evaluate:run_eval",
    help="Every selection method through the loop over seeds, each model measured: eval.json, eval.md, eval.svg.",
    description="Run one corpus (the generated ground-truth task, or a natural corpus) through the rows of the table "
    "(pipeline/eval/rows.py): oracle (knows the corrupted tokens), full, random, attn, rel, sstoken, rho1 and "
    "tokencleaning (corpus-wide as published, and per sample), each from the same base with the same seed, samples and "
    "optimizer steps, in one pass of slices each scored before it is trained on, over several seeds; then measure each "
    "model (held-out NLL, exact match, selection quality against the known corrupted tokens, kept tokens, steps, "
    "seconds) and write the table. A power gate (oracle - full against 3 x the seed spread) says whether the eval can "
    "tell methods apart at this size; rows are ranked only on measures that pass it. Finished cells are not redone. "
    "CONFIG: see jobs/configs/eval.yaml; --scale multiplies the samples for larger machines.",
    report=report,
)


def register(commands: argparse._SubParsersAction) -> None:
    """`sstoken eval [CONFIG] [--flags]`: CONFIG is the same file `--config` names."""
    _register(commands)
    commands.choices["eval"].add_argument("eval_config", nargs="?", type=Path, action=_ConfigFile, metavar="CONFIG",
                                          help="YAML file with the eval's settings (as --config).")
