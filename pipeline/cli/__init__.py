"""The `sstoken` command: one console script, one module per subcommand."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pipeline.cli import demo, models, prepare, score, select

SUBCOMMANDS = (prepare, score, select, models, demo)

# Errors that mean "bad input or setup": shown as one clear line, exit status 2.
_USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sstoken", description=__doc__)
    parser.add_argument("--verbose", action="store_true", help="Show library logs and full tracebacks.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if arguments.verbose else logging.WARNING, format="%(message)s")
    try:
        return int(arguments.handler(arguments) or 0)
    except _USER_ERRORS as error:
        if arguments.verbose:
            raise
        print(f"sstoken {arguments.command}: error: {error}", file=sys.stderr)
        return 2
