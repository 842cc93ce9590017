"""`sstoken report` on a 100k-sample synthetic scores folder: seconds and page size (goal: under 60 s on 2 cores, page
under 20 MB), and its time against a named baseline measured in the same process: reading every column of the
tokenized and scores shards into memory with polars (the least any report over every token has to do).

    python tests/benchmarks/bench_report.py [--samples 100000] [--mean-tokens 200] [--folder /tmp/sstoken-bench-report]

The folder (tokenized + scores, built with numpy and pyarrow; reused when it exists) is not timed; the
report run is, in this process, end to end (open and checksum the shards, every figure over every
target, plots, heatmaps, write). Run with `taskset -c 0,1` to hold it to 2 cores.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--mean-tokens", type=int, default=200)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/sstoken-bench-report"))
    arguments = parser.parse_args()

    from pipeline.views.report import run_report
    from pipeline.views.report_config import ReportConfig
    from tests import tiny
    from tests.score_factories import write_synthetic_scores, write_synthetic_tokenized

    folder = arguments.folder / f"{arguments.samples}x{arguments.mean_tokens}"
    scores = folder / "scores"
    if not (scores / "manifest.json").is_file():
        started = time.monotonic()
        tokenizer = tiny.save_tokenizer(folder / "tokenizer")
        tokenized = write_synthetic_tokenized(folder / "tokenized", tokenizer, samples=arguments.samples,
                                              mean_tokens=arguments.mean_tokens)
        write_synthetic_scores(scores, tokenized)
        print(f"built {arguments.samples:,} samples in {time.monotonic() - started:.1f} s (not timed)")
    import polars as pl

    started = time.monotonic()
    frames = [pl.read_parquet(sorted(str(p) for p in (folder / name).glob("part-*.parquet"))) for name in ("tokenized", "scores")]
    baseline = time.monotonic() - started
    del frames
    output = folder / "report.html"
    started = time.monotonic()
    summary = run_report(ReportConfig(folder=scores, output=output, overwrite=True))
    seconds = time.monotonic() - started
    size = output.stat().st_size
    cores = len(os.sched_getaffinity(0))
    print(f"report: {summary.counts['samples']:,} samples, {summary.counts['targets']:,} targets, "
          f"{summary.counts['samples_embedded']} samples embedded")
    print(f"seconds: {seconds:.1f} on {cores} cores (goal < 60); page: {size / 1e6:.2f} MB (goal < 20)")
    print(f"baseline (read every column of the shards): {baseline:.1f} s; report / baseline: {seconds / baseline:.1f}x")


if __name__ == "__main__":
    main()
