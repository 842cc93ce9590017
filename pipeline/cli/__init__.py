"""The `sstoken` command: one console script, one module per subcommand.

Exit status: 0 done; 2 a user error (bad input, setting or environment: one line on stderr);
3 prepare wrote the corpus but some input gave no valid row; 4 validate found a problem;
1 a bug, with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.cli import demo, eval, export, inspect, models, prepare, report, run, score, select, train, validate
from pipeline.runtime.errors import UserError, refusal_from_os_error

SUBCOMMANDS = (prepare, score, select, train, run, eval, models, demo, report, inspect, export, validate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sstoken", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", action="store_true", help="Show library logs and full tracebacks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(commands)
    return parser


def one_line(message: str) -> str:
    """A message on one line: its lines joined with "; " (a YAML parser's error spans several)."""
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; user errors become one line and exit status 2, anything else keeps its traceback."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(arguments.handler(arguments) or 0)
    except UserError as error:
        return _user_error(arguments, error)
    except OSError as error:  # the one place an OS refusal the user can fix becomes a user error
        refusal = refusal_from_os_error(error, where=getattr(arguments, "output_folder", None))
        if refusal is None:
            raise
        return _user_error(arguments, refusal)


def _user_error(arguments: argparse.Namespace, error: UserError) -> int:
    if arguments.verbose:
        raise error
    print(f"sstoken {arguments.command}: error: {one_line(str(error))}", file=sys.stderr)
    return error.exit_code
