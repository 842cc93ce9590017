"""Benchmark: the Ray score job's tokens/s against the in-process scorer on the same data.

    python tests/benchmarks/bench_ray_job.py [--shards 4] [--rows 8] [--scale 4] [--rounds 2]

    python tests/benchmarks/bench_ray_job.py --naive [--history noised]

Uses SmolLM2-135M when `pipeline.runtime.model_zoo` has it cached (`sstoken models fetch smollm2-135m`),
else the tiny test model; says which. By default current and history are the same checkpoint (one
forward per batch on both paths). Runs alternate, in alternating order (the machine is noisy);
per-round ratios and medians are printed:
- in-process: Scorer + score_shard over every shard, model loading excluded;
- Ray job, end to end: run_score_job's scoring phase (actor start-up and model loading included);
- Ray job, in the actors: the same tokens over the time spent inside the actors' score calls.
The target is a ratio >= 0.85 (Ray job / in-process) on a corpus large enough to amortise start-up.

`--history noised` scores against a distinct history checkpoint (the current one plus 5% noise, as in
bench_scorer.py) with no history cache, so the job runs both passes (history, then current) as a
first round does. `--naive` adds the naive eager scorer of the scoring issue on the same samples
(tests/pipeline/scoring/reference.py: two `model(..., output_attentions=True)` calls with full logits
per sample, both models loaded outside the timing) and prints the Ray job's end-to-end rate against
it: the job's figure includes Ray, actor start-up and model loading, the naive one does not.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.runtime.checkpoints import load_tokenizer  # noqa: E402
from pipeline.runtime.ray_session import machine_cpus  # noqa: E402
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job  # noqa: E402
from tests import tiny  # noqa: E402
from tests.benchmarks.bench_scorer import code_version, history_checkpoint  # noqa: E402
from tests.factories import write_tokenized  # noqa: E402


def pick_model(scratch: Path) -> tuple[Path, str]:
    from pipeline.runtime import model_zoo

    folder = model_zoo.model_dir("smollm2-135m")
    if model_zoo.is_complete(folder):
        return folder, "SmolLM2-135M-Instruct (real model, float32 safetensors)"
    folder = scratch / "tiny-llama"
    tiny.save_tokenizer(folder)
    tiny.save_model(folder, "llama", len(load_tokenizer(folder)))
    return folder, "tiny Llama test model (SmolLM2-135M not cached: `sstoken models fetch smollm2-135m`)"


def in_process(model: Path, history: Path, data: Path, config: ScoreJobConfig) -> float:
    """Our scorer in this process over every shard (models loaded untimed); a distinct history runs first."""
    import gc

    from pipeline.scoring.scorer import Scorer, nll_table, score_shard

    settings = config.score_settings().model_copy(update={"threads": config.threads or machine_cpus()})
    selection = config.select_settings()
    parts = [pq.read_table(part) for part in sorted(data.glob("part-*.parquet"))]
    tokens = sum(sum(table.column("n_tokens").to_pylist()) for table in parts)
    histories: list = [None] * len(parts)
    seconds = 0.0
    if history != model:  # phase 1: the history model alone, as the job does when nothing is cached
        scorer = Scorer(history, settings, importance=False)
        started = time.monotonic()
        histories = [nll_table(scorer, table) for table in parts]
        seconds += time.monotonic() - started
        del scorer
        gc.collect()
    scorer = Scorer(model, settings, importance=selection.uses_attention)
    started = time.monotonic()
    for table, history_nll in zip(parts, histories):
        score_shard(scorer, table, selection, history_nll=history_nll, same_checkpoint=history_nll is None)
    return tokens / (seconds + time.monotonic() - started)


def naive(current: Path, history: Path, data: Path) -> float:
    """The naive eager scorer over every sample of every shard, one sample at a time (loads untimed)."""
    from tests.pipeline.scoring.reference import load_eager, naive_scores

    models = load_eager(current), load_eager(history)
    tokens, started = 0, time.monotonic()
    for part in sorted(data.glob("part-*.parquet")):
        table = pq.read_table(part, columns=["input_ids", "trainable"])
        for ids, trainable in zip(table.column("input_ids").to_pylist(), table.column("trainable").to_pylist()):
            naive_scores(*models, np.asarray(ids, dtype=np.int64), np.asarray(trainable, dtype=bool))
            tokens += len(ids)
    return tokens / (time.monotonic() - started)


def ray_job(config: ScoreJobConfig) -> tuple[float, float]:
    shutil.rmtree(config.output, ignore_errors=True)
    if config.history_cache is not None:
        shutil.rmtree(config.history_cache, ignore_errors=True)  # every run pays the history pass it measures
    summary = run_score_job(config)
    return summary.details["tokens_per_s"], summary.counts["tokens_scored"] / summary.details["shard_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="samples per shard")
    parser.add_argument("--scale", type=int, default=4, help="stretches each sample's text")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--history", default="same", choices=["same", "noised"],
                        help="same: history = current (one pass); noised: a distinct history, both passes, no cache")
    parser.add_argument("--naive", action="store_true", help="also time the naive eager scorer on the same samples")
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sstoken-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model, description = pick_model(scratch)
        history = model
        if arguments.history == "noised":
            history = history_checkpoint(model)
        data = write_tokenized(scratch / "tokenized", load_tokenizer(model), [arguments.rows] * arguments.shards, seed=7,
                               scale=arguments.scale)
        tokens = sum(pq.read_metadata(p).num_rows for p in data.glob("part-*.parquet"))
        n_tokens = sum(sum(pq.read_table(p, columns=["n_tokens"]).column(0).to_pylist()) for p in data.glob("part-*.parquet"))
        config = ScoreJobConfig(
            data=data, current=model, history=history, output=scratch / "scores", history_cache=scratch / "cache",
            dtype=arguments.dtype, progress=False,
        )
        print(f"commit {code_version()}; model: {description}; history {arguments.history}\ndata: {arguments.shards} shards, {tokens} samples, {n_tokens} tokens; "
              f"{machine_cpus()} CPUs, dtype {arguments.dtype}")
        direct, job_total, job_actor, naive_rates = [], [], [], []
        for round_index in range(arguments.rounds):
            # Alternate the order: on a shared machine, load drifts within a round too.
            if round_index % 2:
                total, actor = ray_job(config)
                direct.append(in_process(model, history, data, config))
            else:
                direct.append(in_process(model, history, data, config))
                total, actor = ray_job(config)
            job_total.append(total)
            job_actor.append(actor)
            if arguments.naive:
                naive_rates.append(naive(model, history, data))
                print(f"round {round_index + 1}: naive eager {naive_rates[-1]:.0f} tokens/s; Ray job end to end "
                      f"x{total / naive_rates[-1]:.2f}, in-process x{direct[-1] / naive_rates[-1]:.2f} of it", flush=True)
            print(f"round {round_index + 1}: in-process {direct[-1]:.0f} tokens/s; Ray job {total:.0f} tokens/s end to end "
                  f"(ratio {total / direct[-1]:.2f}), {actor:.0f} tokens/s in the actors (ratio {actor / direct[-1]:.2f})",
                  flush=True)
        median = statistics.median
        print(f"median: in-process {median(direct):.0f} tokens/s | Ray job end to end {median(job_total):.0f} tokens/s, "
              f"in the actors {median(job_actor):.0f} tokens/s | median paired ratio: end to end "
              f"{median(t / d for t, d in zip(job_total, direct)):.2f}, in the actors "
              f"{median(a / d for a, d in zip(job_actor, direct)):.2f} (target >= 0.85)")
        if naive_rates:
            print(f"naive eager {median(naive_rates):.0f} tokens/s | median paired ratio: Ray job end to end "
                  f"x{median(t / n for t, n in zip(job_total, naive_rates)):.2f}, in-process "
                  f"x{median(d / n for d, n in zip(direct, naive_rates)):.2f}")

if __name__ == "__main__":
    main()
