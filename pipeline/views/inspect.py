"""`sstoken inspect`'s work: pick samples of a run, scores or masks folder and read their tokens and numbers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.views.inspect_config import InspectConfig
from pipeline.views.run_stats import open_stats
from pipeline.views.stats import SampleView, pick_samples, sample_views
from pipeline.views.token_text import TokenText


@dataclass(frozen=True)
class Inspection:
    """The samples to show, and where their token texts came from (None: ids shown, no tokenizer found)."""

    folder: Path
    samples: list[SampleView]
    tokenizer: Path | None
    show_numbers: bool = True


def inspect_samples(config: InspectConfig) -> Inspection:
    stats = open_stats(config.folder, config.data)
    round = stats.last_round if config.round is None else stats.part(config.round).round
    samples = stats.samples().filter(pl.col("round") == round).collect()
    chosen = pick_samples(samples, ids=list(config.sample), top=config.top or 0, bottom=config.bottom or 0,
                          random=config.random or 0, seed=config.seed)
    token_text = TokenText.first_found(stats.tokenizer_folders())
    return Inspection(Path(config.folder), sample_views(stats, round, chosen, token_text), token_text.source,
                      config.numbers)
