"""`sstoken report`'s work: open the folder (run, scores, masks or eval), compute the figures, write one page.

    run_report(ReportConfig(folder="runs/demo", output="report.html")) -> StageSummary

A run's rounds are compared with pipeline.selection.compare (agreement, flips both ways) and its training
curves read from each round's metrics.jsonl. The page replaces an existing file only when that file
is an sstoken report (or with --overwrite).
"""

from __future__ import annotations

import time
from pathlib import Path

import polars as pl

from pipeline.loop.run_folder import RunFolder
from pipeline.runtime.files import REJECTED, ArtifactError
from pipeline.runtime.stage_output import StageSummary
from pipeline.selection.compare import mask_agreement
from pipeline.views.report_config import ReportConfig
from pipeline.views.report_figures import flipped_tokens, round_figures
from pipeline.views.report_page import GENERATOR, write_page
from pipeline.views.report_render import MAX_TOKENS_PER_SAMPLE, ReportInputs, render_eval, render_report
from pipeline.views.run_stats import EVAL_RECORD, open_stats, train_curves
from pipeline.views.stats import Stats, pick_samples, sample_views
from pipeline.views.token_text import TokenText

HIGHLIGHTED = 5  # samples per group: highest, lowest and middle score
RANDOM = 10


def _refuse_foreign_output(config: ReportConfig) -> None:
    output = Path(config.output)
    if output.is_dir():
        raise ArtifactError(f"--output {output} is a folder; name the HTML file to write, e.g. {output / 'report.html'}")
    if output.exists() and not config.overwrite:
        with open(output, "rb") as handle:
            head = handle.read(2048).decode("utf-8", "replace")
        if GENERATOR not in head:
            raise ArtifactError(f"{output} exists and is not an sstoken report; choose another --output or pass --overwrite")


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
    _refuse_foreign_output(config)
    if (folder / EVAL_RECORD).is_file() and not (folder / "run.json").is_file():
        size = write_page(output, render_eval(folder))
        return StageSummary("report", output, counts={"bytes": size}, timings={"total_s": time.monotonic() - started},
                            details={"kind": "eval"})
    stats = open_stats(folder, config.data)
    token_text = TokenText.first_found(stats.tokenizer_folders())
    figures = [round_figures(stats, part.round, token_text) for part in stats.parts]
    last = figures[-1]
    views = sample_views(stats, last["round"], _embedded(last["samples"], config.embed_tokens, config.seed), token_text)
    pairs = list(zip(stats.parts, stats.parts[1:]))
    agreements = [{"first": a.round, "second": b.round} | mask_agreement(a.masks, b.masks) for a, b in pairs]
    flipped = [{"first": a.round, "second": b.round} | flipped_tokens(stats, a.round, b.round, token_text) for a, b in pairs]
    inputs = ReportInputs(stats, folder, figures, views, train_curves(stats).to_dicts(), agreements, flipped,
                          token_text.source, prepared_corpus(stats))
    size = write_page(output, render_report(inputs))
    notes = [] if token_text.source else ["no tokenizer folder found in the manifests: tokens are shown as ids"]
    return StageSummary(
        "report", output,
        counts={"rounds": len(figures), "samples": last["totals"]["samples"], "targets": last["totals"]["trainable"],
                "kept": last["totals"]["kept"], "samples_embedded": len(views), "bytes": size},
        timings={"total_s": time.monotonic() - started}, notes=notes,
    )
