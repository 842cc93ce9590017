"""`sstoken report`'s work: open the folder (run, scores, masks or eval), compute the figures, write one page.

    run_report(ReportConfig(folder="runs/demo", output="report.html")) -> StageSummary

A run's rounds are compared with pipeline.selection.compare (agreement, flips both ways) and its training
curves read from each round's metrics.jsonl. The page is written through the stage runner's one-file
output: it replaces an existing file only when that file is an sstoken report (or with --overwrite),
and never lands inside the folder it reports on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from pipeline.eval.records import EVAL_RECORD
from pipeline.loop.run_folder import RUN_RECORD, RunFolder
from pipeline.runtime.files import REJECTED
from pipeline.runtime.stage_output import StageSummary
from pipeline.runtime.stage_runner import run_file_stage
from pipeline.selection.compare import mask_agreement
from pipeline.views.report_config import ReportConfig
from pipeline.views.report_figures import flipped_tokens, round_figures
from pipeline.views.report_page import GENERATOR
from pipeline.views.report_render import MAX_TOKENS_PER_SAMPLE, ReportInputs, render_eval, render_report
from pipeline.views.run_stats import open_stats, train_curves
from pipeline.views.stats import Stats, pick_samples, sample_views
from pipeline.views.token_text import TokenText

HIGHLIGHTED = 5  # samples per group: highest, lowest and middle score
RANDOM = 10


def _embedded(samples: pl.DataFrame, budget: int, seed: int) -> list[tuple[str, str]]:
    """The groups shown (highest, lowest, middle score, a few random), then more random samples the search box
    finds ("embedded"), while the token budget lasts (a group's first sample always goes in)."""
    chosen = pick_samples(samples, top=HIGHLIGHTED, bottom=HIGHLIGHTED, middle=HIGHLIGHTED, random=samples.height, seed=seed)
    lengths = dict(zip(samples["sample_id"].to_list(), samples["n_tokens"].to_list()))
    picked: list[tuple[str, str]] = []
    used = randoms = 0
    for why, sample_id in chosen:
        cost = min(lengths[sample_id], MAX_TOKENS_PER_SAMPLE)
        if used + cost > budget and (picked or why == "random"):
            continue
        if why == "random":
            randoms += 1
            why = "random" if randoms <= RANDOM else "embedded"
        picked.append((why, sample_id))
        used += cost
    return picked


def prepared_corpus(stats: Stats) -> Path:
    """The folder `sstoken prepare` wrote (with rejected.parquet): a run's tokenized/, else the last round's data or,
    for a slice or subset of a corpus, the corpus its manifest names."""
    if stats.root is not None and stats.record is not None:
        return RunFolder(stats.root).tokenized
    part = stats.parts[-1]
    for entry in part.tokenized_manifest.get("inputs", []):
        if entry.get("kind") == "tokenized" and (Path(entry.get("path", "")) / REJECTED).is_file():
            return Path(entry["path"])
    return part.tokenized


def run_report(config: ReportConfig) -> StageSummary:
    started = time.monotonic()
    folder, output = Path(config.folder), Path(config.output)
    inputs = [folder, *([Path(config.data)] if config.data is not None else [])]

    def write(make: Callable[[], str]) -> int:
        """The page through the stage runner: a folder or another file at --output, or an output inside the folder
        reported on, is refused before any figure is computed."""
        return run_file_stage("report", output, make, mark=GENERATOR, overwrite=config.overwrite, inputs=inputs)

    if (folder / EVAL_RECORD).exists() and not (folder / RUN_RECORD).exists():
        size = write(lambda: render_eval(folder))
        return StageSummary("report", output, counts={"bytes": size}, timings={"total_s": time.monotonic() - started},
                            details={"kind": "eval"})
    figures: dict[str, Any] = {}

    def page() -> str:
        stats = open_stats(folder, config.data)
        token_text = TokenText.first_found(stats.tokenizer_folders())
        rounds = [round_figures(stats, part.round, token_text) for part in stats.parts]
        last = rounds[-1]
        views = sample_views(stats, last["round"], _embedded(last["samples"], config.embed_tokens, config.seed), token_text)
        pairs = list(zip(stats.parts, stats.parts[1:]))
        agreements = [{"first": a.round, "second": b.round} | mask_agreement(a.masks, b.masks) for a, b in pairs]
        flipped = [{"first": a.round, "second": b.round} | flipped_tokens(stats, a.round, b.round, token_text) for a, b in pairs]
        inputs = ReportInputs(stats, folder, rounds, views, train_curves(stats).to_dicts(), agreements, flipped,
                              token_text.source, prepared_corpus(stats))
        figures.update(rounds=len(rounds), last=last, views=len(views), token_source=token_text.source)
        return render_report(inputs)

    size = write(page)
    last = figures["last"]
    notes = [] if figures["token_source"] else ["no tokenizer folder found in the manifests: tokens are shown as ids"]
    return StageSummary(
        "report", output,
        counts={"rounds": figures["rounds"], "samples": last["totals"]["samples"], "targets": last["totals"]["trainable"],
                "kept": last["totals"]["kept"], "samples_embedded": figures["views"], "bytes": size},
        timings={"total_s": time.monotonic() - started}, notes=notes,
    )
