"""`sstoken inspect DIR --sample ID | --top N | --bottom N | --random N`: samples' tokens coloured by score, numbers below."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.text import Text

from pipeline.cli.command import stage_command
from pipeline.views.inspect_config import InspectConfig
from pipeline.views.token_view import numbers_table, plain_legend, score_legend, score_scale, score_view

if TYPE_CHECKING:
    from pipeline.views.inspect import Inspection


def show(inspection: Inspection, console: Console) -> int:
    """Each sample: a header line, its tokens (coloured on a terminal, marked in plain text), then its numbers."""
    plain = not console.is_terminal
    for view in inspection.samples:
        rows = view.tokens.to_dicts()
        scale = score_scale([row["score"] for row in rows if row["trainable"]])
        header = (f"round {view.round} · sample {view.sample_id} · {view.source} · {view.why} · "
                  f"{view.targets} targets, {view.kept} kept")
        if plain:
            console.print(Text(f"== {header}"), soft_wrap=True)
        else:
            console.rule(Text(header))
        text = score_view(view.pieces, view.tokens["trainable"].to_list(), view.tokens["keep"].to_list(),
                          view.tokens["score"].to_list(), scale, plain=plain)
        console.print(text, soft_wrap=plain)
        console.print(Text(plain_legend()) if plain else score_legend(scale), soft_wrap=True)
        if inspection.show_numbers:
            console.print(numbers_table(view.pieces, rows))
    if inspection.tokenizer is None:
        console.print(Text("note: no tokenizer folder found in the manifests; tokens shown as ⟨id⟩"), soft_wrap=True)
    return 0


register = stage_command(
    "inspect",
    InspectConfig,
    "pipeline.views.inspect:inspect_samples",
    help="Show samples' tokens coloured by score (kept, dropped, context) with their numbers.",
    description="Print samples of a run folder (its last round, or --round N), a scores folder or a masks folder, "
    "token by token: targets on a background coloured by their score, kept ones bold, dropped ones struck "
    "through, context dim; then a table of each target's nll_cur, nll_hist, rel, attn and score. Piped to a "
    "file it prints plain text: kept targets in [brackets], dropped ones in ~tildes~.",
    report=show,
    positional="folder",
)
