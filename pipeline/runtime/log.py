"""The lines a long command writes while it works: `sstoken run: r000 ...` on stderr, so stdout keeps its summary."""

from __future__ import annotations

import sys


def say(command: str, message: str) -> None:
    """One line of `sstoken COMMAND`'s log, on stderr, flushed (a watcher sees it as it happens)."""
    print(f"sstoken {command}: {message}", file=sys.stderr, flush=True)
