"""Benchmark: the stages' `runner: process` against `runner: ray`, the same work, in one process run.

    python tests/benchmarks/bench_runners.py             # about two minutes on 2 CPU cores
    python tests/benchmarks/bench_runners.py --samples 16

Not collected by pytest. On one embedded Ray (started once, before either side), SmolLM2-135M:
(a) the train stage, one round's LoRA training (`run_train`): Ray Train's TorchTrainer (a
    controller and a worker process that loads torch and the model) against `run_rank` in this
    process; both from the same start and inputs, so they end with the same tensors;
(b) the score stage (`run_score_job`, current = history = the base, attention and NLL): a Ray actor
    (a new process importing torch and loading the model) against the same scorer in this process.
Prints the seconds of each side and the ratio ray / process: the start-up a short round saves,
which is what `sstoken eval` pays 2 x (7 methods + a reference) x seeds times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.runtime.checkpoints import load_tokenizer  # noqa: E402
from pipeline.runtime.model_zoo import ensure_model  # noqa: E402
from pipeline.runtime.ray_session import ray_session  # noqa: E402
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job  # noqa: E402
from pipeline.training.train_stage import TrainConfig, run_train  # noqa: E402
from tests.factories import write_keep_masks, write_tokenized  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="Samples of the round (batch 4: samples / 4 steps).")
    arguments = parser.parse_args()
    model = ensure_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as folder, ray_session():
        root = Path(folder)
        data = write_tokenized(root / "tokenized", load_tokenizer(model), [arguments.samples], seed=0, scale=3)
        masks = write_keep_masks(root / "masks", data, ratio=0.6, seed=0)
        seconds: dict[str, dict[str, float]] = {"train": {}, "score": {}}
        for runner in ("ray", "process"):
            started = time.monotonic()
            run_train(TrainConfig(data=data, masks=masks, model=model, output=root / f"train-{runner}", ray={"runner": runner},
                                  batch_size=4, micro_batch_size=4, progress=False, checkpoint_every=100))
            seconds["train"][runner] = time.monotonic() - started
            started = time.monotonic()
            run_score_job(ScoreJobConfig(data=data, current=model, output=root / f"score-{runner}", ray={"runner": runner},
                                         history_cache=root / f"cache-{runner}", workers=1, progress=False,
                                         method="attn"))
            seconds["score"][runner] = time.monotonic() - started
    for stage, sides in seconds.items():
        print(f"{stage} stage, {arguments.samples} samples: runner ray {sides['ray']:.1f} s, runner process "
              f"{sides['process']:.1f} s: ray / process = {sides['ray'] / sides['process']:.2f}x")


if __name__ == "__main__":
    main()
