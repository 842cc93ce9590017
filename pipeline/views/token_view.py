"""A sample's tokens side by side with their flags, coloured for a terminal: what was kept, what was not,
and (score_view) how each target scored, with its numbers in a table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from pipeline.views.score_colours import RAMP, score_colour

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


# Plain text (no terminal): kept targets in [brackets], dropped ones in ~tildes~, context as it is.
PLAIN_MARKS = {"kept": ("[", "]"), "dropped": ("~", "~"), "context": ("", "")}


def token_role(target: bool, kept: bool) -> str:
    return "kept" if kept else "dropped" if target else "context"


def score_scale(scores: Sequence[float]) -> tuple[float, float]:
    """Lowest and highest of the finite scores (the colour scale of one view)."""
    finite = [s for s in scores if s is not None and math.isfinite(s)]
    return (min(finite), max(finite)) if finite else (0.0, 1.0)


def score_view(
    pieces: Sequence[str], trainable: Sequence[bool], keep: Sequence[bool], score: Sequence[float],
    scale: tuple[float, float], plain: bool = False,
) -> Text:
    """Targets on a background coloured by score (kept bold, dropped struck through), context dim; with
    `plain`, no colour: kept targets in [brackets], dropped ones in ~tildes~."""
    text = Text()
    for piece, target, kept, value in zip(pieces, trainable, keep, score):
        role = token_role(target, kept)
        if plain:
            opening, closing = PLAIN_MARKS[role]
            text.append(f"{opening}{piece}{closing}")
        elif role == "context":
            text.append(piece, style=STYLES["context"])
        else:
            colour = score_colour(value, *scale)
            text.append(piece, style=f"black on {colour}" + (" bold" if kept else " strike"))
    return text


def plain_legend() -> str:
    return "[kept]  ~dropped~  context as is"


def score_legend(scale: tuple[float, float]) -> Text:
    low, high = scale
    text = Text.assemble(("context", STYLES["context"]), "  ", ("kept", f"black on {RAMP[-1]} bold"), "  ",
                         ("dropped", f"black on {RAMP[2]} strike"), f"  score {low:.3g} ")
    for colour in RAMP:
        text.append("  ", style=f"on {colour}")
    text.append(f" {high:.3g}")
    return text


def _figure(value: float | None) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4g}"


def numbers_table(pieces: Sequence[str], rows: Sequence[dict[str, Any]], title: str = "") -> Table:
    """One row per target: position, token, kept or dropped, nll_cur, nll_hist, rel, attn, score."""
    table = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("pos", "token", "keep", "nll_cur", "nll_hist", "rel", "attn", "score"):
        table.add_column(column, justify="left" if column in ("token", "keep") else "right", no_wrap=True)
    for piece, row in zip(pieces, rows):
        if row["trainable"]:
            table.add_row(str(row["position"]), repr(piece)[1:-1], token_role(True, row["keep"]),
                          *(_figure(row[name]) for name in ("nll_cur", "nll_hist", "rel", "attn", "score")))
    return table
