"""`sstoken prepare` (placeholder)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("prepare", help="(not yet available)")
    parser.set_defaults(handler=lambda arguments: 1)
