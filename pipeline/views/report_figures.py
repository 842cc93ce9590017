"""The numbers of `sstoken report`, computed over every sample with polars; the page only draws them.

One collect of the round's targets (token_id, keep, signals, position in the response) feeds the
distributions, the kept ratio by position and the token counts; per-sample and per-source figures
come from the shards' count columns, so a 100k-sample corpus is read about once.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from pipeline.runtime.files import REJECTED
from pipeline.views.stats import Stats, rollups_of, totals
from pipeline.views.token_text import TokenText

# The per-sample roll-ups the report shows (sample_rollups' columns), with their labels.
ROLLUPS = {"mean_score": "mean score", "kept_share": "kept share", "mean_rel": "mean REL", "mean_entropy": "mean entropy",
           "mean_loss": "mean loss (nll_cur)"}
ROLLUP_LEVELS = (0, 10, 50, 90, 100)
POSITION_BINS = 20
TOP_TOKENS = 20
HISTOGRAM_BINS = 50


def _finite(values: pl.Series) -> np.ndarray:
    array = values.drop_nulls().to_numpy()
    return array[np.isfinite(array)]


def percentiles(array: np.ndarray, levels: list[float], most: int = 1_000_000) -> list[float]:
    """Percentiles of at most `most` of the values (drawn with a fixed seed): a scale, not a statistic to report."""
    if len(array) > most:
        array = array[np.random.default_rng(0).integers(0, len(array), most)]
    return [float(v) for v in np.percentile(array, levels)]


def histogram(values: pl.Series, bins: int = HISTOGRAM_BINS) -> dict[str, list[float]]:
    """Counts of every value over `bins` equal bins between the 0.5th and 99.5th percentiles (outliers in the end bins)."""
    array = _finite(values)
    if not len(array):
        return {"edges": [], "counts": []}
    low, high = percentiles(array, [0.5, 99.5])
    if high <= low:
        low, high = float(array.min()) - 0.5, float(array.max()) + 0.5
    counts, edges = np.histogram(np.clip(array, low, high), bins=bins, range=(low, high))
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def round_targets(stats: Stats, round: int) -> pl.DataFrame:
    """Every target of one round, the columns the figures need."""
    columns = ("round", "token_id", "trainable", "keep", "rel", "attn", "score", "response_position")
    one_round = replace(stats, parts=(stats.part(round),))
    return (one_round.tokens(columns=columns).filter(pl.col("trainable"))
            .select("token_id", "keep", "rel", "attn", "score", "response_position").collect())


def position_curve(targets: pl.DataFrame, bins: int = POSITION_BINS) -> dict[str, list[float]]:
    """Kept share of the targets in each tenth (twentieth) of the response."""
    curve = (targets.group_by((pl.col("response_position") * bins).floor().clip(0, bins - 1).cast(pl.Int32).alias("bin"))
             .agg(pl.col("keep").mean().alias("kept_ratio"), pl.len().alias("targets")).sort("bin"))
    return {"centres": ((curve["bin"].to_numpy() + 0.5) / bins).tolist(), "kept_ratio": curve["kept_ratio"].to_list(),
            "targets": curve["targets"].to_list()}


def token_counts(targets: pl.DataFrame, token_text: TokenText, top: int = TOP_TOKENS) -> dict[str, list[dict[str, Any]]]:
    """The token strings most often dropped and most often kept, with how often each is a target, kept, dropped."""
    per_id = targets.group_by("token_id").agg(pl.len().alias("targets"), pl.col("keep").sum().alias("kept"))
    per_id = per_id.with_columns(pl.Series("text", token_text.texts(per_id["token_id"].to_list()), dtype=pl.String))
    per_text = (per_id.group_by("text").agg(pl.col("targets").sum(), pl.col("kept").sum())
                .with_columns((pl.col("targets") - pl.col("kept")).alias("dropped"),
                              (pl.col("kept") / pl.col("targets")).alias("kept_ratio")))
    return {
        "dropped": per_text.sort(["dropped", "text"], descending=[True, False]).head(top).to_dicts(),
        "kept": per_text.sort(["kept", "text"], descending=[True, False]).head(top).to_dicts(),
    }


def rejected_rows(tokenized: Path, limit: int = 20) -> dict[str, Any]:
    """rejected.parquet of a tokenized folder: rows per reason, and the first `limit` rows."""
    path = Path(tokenized) / REJECTED
    if not path.is_file():
        return {"by_reason": {}, "examples": [], "total": 0}
    frame = pl.read_parquet(path)
    by_reason = frame.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return {"by_reason": dict(zip(by_reason["reason"].to_list(), by_reason["len"].to_list())),
            "examples": frame.head(limit).to_dicts(), "total": frame.height}


def rollup_figures(rollups: pl.DataFrame) -> dict[str, Any]:
    """Each per-sample roll-up over the round's samples: how many have one, its percentiles (ROLLUP_LEVELS: min,
    p10, median, p90, max; None when no sample has a value) and a histogram."""
    figures = {}
    for name in ROLLUPS:
        values = _finite(rollups[name].cast(pl.Float64))
        figures[name] = {"samples": len(values),
                         "percentiles": [float(v) for v in np.percentile(values, ROLLUP_LEVELS)] if len(values) else None,
                         "histogram": histogram(rollups[name].cast(pl.Float64), bins=20)}
    return figures


def round_figures(stats: Stats, round: int, token_text: TokenText) -> dict[str, Any]:
    """Everything the page shows about one round, over all of its samples."""
    targets = round_targets(stats, round)
    samples = replace(stats, parts=(stats.part(round),)).samples().collect()
    selection = stats.part(round).selection
    sources = totals(samples.lazy(), ["round", "source"]).collect()
    scores = _finite(targets["score"])
    return {
        "round": round,
        "samples": samples,
        "sources": sources.to_dicts(),
        "histograms": {name: histogram(targets[name]) for name in ("rel", "attn", "score")},
        "score_by_keep": {"kept": histogram(targets.filter(pl.col("keep"))["score"]),
                          "dropped": histogram(targets.filter(~pl.col("keep"))["score"])},
        "kept_ratio_per_sample": histogram(samples["kept_ratio"], bins=20),
        "rollups": rollup_figures(rollups_of(samples)),
        # what a sample filter (select --sample-ratio) removed, as the selection recorded it; None without one
        "sample_filter": ({name: selection.get(name) for name in ("sample_ratio", "sample_by", "sample_cut", "samples")}
                          if "samples" in selection else None),
        "position": position_curve(targets),
        "tokens": token_counts(targets, token_text),
        "score_scale": percentiles(scores, [2, 98]) if len(scores) else [0.0, 1.0],
        "totals": {"samples": samples.height, "tokens": int(samples["n_tokens"].sum()),
                   "trainable": int(samples["n_trainable"].sum()), "kept": int(samples["n_kept"].sum())},
    }


def flipped_tokens(stats: Stats, first: int, second: int, token_text: TokenText, top: int = TOP_TOKENS) -> dict[str, Any]:
    """The token strings whose keep flipped most often between two rounds, each way."""
    flips = stats.flips(first, second).select("token_id", "kept_before").collect()
    result = {}
    for name, before in (("kept_to_dropped", True), ("dropped_to_kept", False)):
        counts = flips.filter(pl.col("kept_before") == before).group_by("token_id").len()
        counts = counts.with_columns(pl.Series("text", token_text.texts(counts["token_id"].to_list()), dtype=pl.String))
        result[name] = (counts.group_by("text").agg(pl.col("len").sum().alias("count"))
                        .sort(["count", "text"], descending=[True, False]).head(top).to_dicts())
    return result
