"""`sstoken models` (placeholder until its issue lands)."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("models", help="(not yet available)")
    parser.set_defaults(handler=lambda arguments: print("sstoken models: not yet available") or 1)
