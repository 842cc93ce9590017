"""Benchmark: the Ray score job's tokens/s against the in-process scorer on the same data.

    python tests/benchmarks/bench_ray_job.py [--shards 4] [--rows 8] [--scale 4] [--rounds 2]

Uses SmolLM2-135M when `pipeline.runtime.model_zoo` has it cached (`sstoken models fetch smollm2-135m`),
else the tiny test model; says which. Current and history are the same checkpoint (one forward per
batch on both paths). Runs alternate, in alternating order (the machine is noisy); per-round ratios and medians are printed:
- in-process: Scorer + score_shard over every shard, model loading excluded;
- Ray job, end to end: run_score_job's scoring phase (actor start-up and model loading included);
- Ray job, in the actors: the same tokens over the time spent inside the actors' score calls.
The target is a ratio >= 0.85 (Ray job / in-process) on a corpus large enough to amortise start-up.
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

import pyarrow.parquet as pq  # noqa: E402

from pipeline.runtime.checkpoints import load_tokenizer  # noqa: E402
from pipeline.runtime.ray_session import machine_cpus  # noqa: E402
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job  # noqa: E402
from tests import tiny  # noqa: E402
from tests.factories import write_tokenized  # noqa: E402


def pick_model(scratch: Path) -> tuple[Path, str]:
    try:
        from pipeline import model_zoo

        folder = model_zoo.model_dir("smollm2-135m")
        if model_zoo.is_complete(folder):
            return folder, "SmolLM2-135M-Instruct (real model, float32 safetensors)"
    except ImportError:
        pass
    folder = scratch / "tiny-llama"
    tiny.save_tokenizer(folder)
    tiny.save_model(folder, "llama", len(load_tokenizer(folder)))
    return folder, "tiny Llama test model (SmolLM2-135M not cached: `sstoken models fetch smollm2-135m`)"


def in_process(model: Path, data: Path, config: ScoreJobConfig) -> float:
    from pipeline.scoring.scorer import Scorer, score_shard

    settings = config.score_settings().model_copy(update={"threads": config.threads or machine_cpus()})
    selection = config.select_settings()
    scorer = Scorer(model, settings, importance=selection.uses_attention)  # history = current: one pass
    tokens, started = 0, time.monotonic()
    for part in sorted(data.glob("part-*.parquet")):
        table = pq.read_table(part)
        score_shard(scorer, table, selection, same_checkpoint=True)
        tokens += sum(table.column("n_tokens").to_pylist())
    return tokens / (time.monotonic() - started)


def ray_job(config: ScoreJobConfig) -> tuple[float, float]:
    shutil.rmtree(config.output, ignore_errors=True)
    summary = run_score_job(config)
    return summary.details["tokens_per_s"], summary.counts["tokens_scored"] / summary.details["shard_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--rows", type=int, default=8, help="samples per shard")
    parser.add_argument("--scale", type=int, default=4, help="stretches each sample's text")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="sstoken-bench-") as scratch_name:
        scratch = Path(scratch_name)
        model, description = pick_model(scratch)
        data = write_tokenized(scratch / "tokenized", load_tokenizer(model), [arguments.rows] * arguments.shards, seed=7,
                               scale=arguments.scale)
        tokens = sum(pq.read_metadata(p).num_rows for p in data.glob("part-*.parquet"))
        n_tokens = sum(sum(pq.read_table(p, columns=["n_tokens"]).column(0).to_pylist()) for p in data.glob("part-*.parquet"))
        config = ScoreJobConfig(
            data=data, current=model, history=model, output=scratch / "scores", history_cache=scratch / "cache",
            dtype=arguments.dtype, progress=False,
        )
        print(f"model: {description}\ndata: {arguments.shards} shards, {tokens} samples, {n_tokens} tokens; "
              f"{machine_cpus()} CPUs, dtype {arguments.dtype}")
        direct, job_total, job_actor = [], [], []
        for round_index in range(arguments.rounds):
            # Alternate the order: on a shared machine, load drifts within a round too.
            if round_index % 2:
                total, actor = ray_job(config)
                direct.append(in_process(model, data, config))
            else:
                direct.append(in_process(model, data, config))
                total, actor = ray_job(config)
            job_total.append(total)
            job_actor.append(actor)
            print(f"round {round_index + 1}: in-process {direct[-1]:.0f} tokens/s; Ray job {total:.0f} tokens/s end to end "
                  f"(ratio {total / direct[-1]:.2f}), {actor:.0f} tokens/s in the actors (ratio {actor / direct[-1]:.2f})",
                  flush=True)
        median = statistics.median
        print(f"median: in-process {median(direct):.0f} tokens/s | Ray job end to end {median(job_total):.0f} tokens/s, "
              f"in the actors {median(job_actor):.0f} tokens/s | median paired ratio: end to end "
              f"{median(t / d for t, d in zip(job_total, direct)):.2f}, in the actors "
              f"{median(a / d for a, d in zip(job_actor, direct)):.2f} (target >= 0.85)")

if __name__ == "__main__":
    main()
