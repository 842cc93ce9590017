"""A sample's tokens side by side with their flags, coloured for a terminal: what was kept, what was not."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.text import Text

STYLES = {"context": "dim", "kept": "bold green", "dropped": "red strike"}


def keep_view(tokenizer: Any, input_ids: Sequence[int], trainable: Sequence[bool], keep: Sequence[bool]) -> Text:
    """Context tokens dim, kept targets bold green, dropped targets struck through in red."""
    text = Text()
    for token_id, target, kept in zip(input_ids, trainable, keep):
        piece = tokenizer.decode([int(token_id)])
        text.append(piece, style=STYLES["kept" if kept else "dropped" if target else "context"])
    return text


def legend() -> Text:
    return Text.assemble(("context", STYLES["context"]), "  ", ("kept", STYLES["kept"]), "  ", ("dropped", STYLES["dropped"]))
