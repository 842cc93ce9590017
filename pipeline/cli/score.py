"""`sstoken score` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("score", help="(not yet available)")
    parser.set_defaults(handler=lambda arguments: print("sstoken score: not yet available") or 1)
