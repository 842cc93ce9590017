"""Benchmark: online selection against masked training and against an offline round, in one process run.

    python tests/benchmarks/bench_online.py                    # SmolLM2-135M, a few minutes on 2 CPU cores
    python tests/benchmarks/bench_online.py --samples 8        # quicker, noisier

Not collected by pytest. Prints:
(a) an online epoch (each step's forward scores every target, the importance of one layer is recomputed,
    the select stage's per-sample code keeps the top ratio, the loss runs on the kept tokens:
    `pipeline.training.online_step.OnlineLoss`) against a plain masked-training epoch over the same data
    and the same kept tokens (each step's masks are the ones the online step just chose); same model,
    same micro-batches, each step's pair repeated interleaved, medians summed; target: online / masked <= 1.15;
(b) an online round against an offline round over the same data: the offline round is the score stage's
    current pass with the history NLLs cached (NLL, importance, per-sample selection:
    `scoring.scorer.score_shard`, median of the repeats) plus the masked epoch of (a); the online round is the
    online epoch of (a).
Model loading excluded on both sides. The history is the starting model itself (the paper's base policy;
its NLLs computed once beforehand, as the cache holds them), method sstoken, ratio 0.6.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from pipeline.runtime.checkpoints import load_tokenizer  # noqa: E402
from pipeline.runtime.files import read_shard  # noqa: E402
from pipeline.scoring.attention import register_importance_attention  # noqa: E402
from pipeline.scoring.history_cache import store_history  # noqa: E402
from pipeline.scoring.score_settings import ScoreSettings  # noqa: E402
from pipeline.scoring.scorer import Scorer, layer_index, nll_table, score_shard  # noqa: E402
from pipeline.scoring.signal_forward import ForwardOptions  # noqa: E402
from pipeline.selection.select_settings import SelectSettings  # noqa: E402
from pipeline.training.finetune import FineTuned  # noqa: E402
from pipeline.training.online_data import load_online_samples, online_index, open_online_data  # noqa: E402
from pipeline.training.online_step import OnlineLoss, online_micro_batch  # noqa: E402
from pipeline.training.train_settings import TrainSettings  # noqa: E402
from pipeline.training.train_step import train_step  # noqa: E402
from pipeline.training.train_worker import micro_batch  # noqa: E402
from pipeline.training.training_data import DataPlan  # noqa: E402
from tests.factories import write_tokenized  # noqa: E402

DEFAULT_MODEL = Path(os.environ.get("SSTOKEN_CACHE", Path.home() / ".cache" / "sstoken")) / "models" / "smollm2-135m"
CPU = torch.device("cpu")


def epochs(model: Path, data: Path, history: Path, settings: TrainSettings, selection: SelectSettings,
           repeats: int) -> dict[str, float]:
    """Seconds of one epoch, online and masked on the online step's own masks: each step run `repeats` times in
    interleaved pairs, the order alternating (after one warm-up pair that gives the masks), its medians counted."""
    source = open_online_data(data, history)
    index = online_index(source)
    plan = DataPlan(index.samples, settings.batch_size, settings.micro_batch_size, 1, settings.seed, 1.0)
    rows = load_online_samples(source, index, np.arange(index.samples))
    tuned = FineTuned(model, settings, CPU)
    tuned.model.set_attn_implementation(register_importance_attention())
    options = ForwardOptions(layer_idx=layer_index(tuned.model, -1, model))
    optimizer = tuned.optimizer()
    seconds = {"online": 0.0, "masked": 0.0}
    kept = 0
    for step in range(plan.steps):
        positions = plan.micro_batches(step, 0, index.lengths)
        batches = [online_micro_batch([rows[int(p)] for p in batch]) for batch in positions]
        loss = OnlineLoss(selection, options, CPU)
        online = train_step(tuned.model, optimizer, batches, 1e-5, 1.0, loss=loss)  # warm-up; gives the step's masks
        chosen = {s.sample_id: s.keep for s in loss.selected}
        masked_rows = {int(p): (rows[int(p)].input_ids, chosen[rows[int(p)].sample_id]) for b in positions for p in b}
        masked = [micro_batch(masked_rows, p) for p in positions]
        plain = train_step(tuned.model, optimizer, masked, 1e-5, 1.0)
        assert plain.kept_tokens == online.kept_tokens, "the masked step trains on other tokens than the online one"
        runs = {"online": lambda: train_step(tuned.model, optimizer, batches, 1e-5, 1.0,
                                             loss=OnlineLoss(selection, options, CPU)),
                "masked": lambda: train_step(tuned.model, optimizer, masked, 1e-5, 1.0)}
        times: dict[str, list[float]] = {"online": [], "masked": []}
        for repeat in range(repeats):  # interleaved, the order alternating, so neither always runs second
            for name in (("online", "masked") if repeat % 2 == 0 else ("masked", "online")):
                started = time.perf_counter()
                runs[name]()
                times[name].append(time.perf_counter() - started)
        seconds = {name: seconds[name] + statistics.median(values) for name, values in times.items()}
        kept += online.kept_tokens
    return seconds | {"steps": plan.steps, "kept": kept, "tokens": int(index.lengths.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="A model folder (default: SmolLM2-135M).")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="Timed repeats per step (medians), after a warm-up.")
    args = parser.parse_args()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = TrainSettings(batch_size=args.batch_size, micro_batch_size=args.micro_batch_size, lora_r=args.lora_r)
    selection = SelectSettings(method="sstoken", ratio=0.6)
    with tempfile.TemporaryDirectory(prefix="sstoken-bench-online-") as folder:
        data = write_tokenized(Path(folder) / "tokenized", load_tokenizer(args.model), [args.samples], seed=1, scale=3)
        tokenized = read_shard(data / "part-00000.parquet", "tokenized")
        scorer = Scorer(args.model, ScoreSettings(threads=args.threads), importance=True)
        history = nll_table(scorer, tokenized)  # what the cache holds: not timed, a cached round never computes it
        store_history(Path(folder) / "history", "part-00000.parquet", history)
        rescores = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            score_shard(scorer, tokenized, selection, history_nll=history)
            rescores.append(time.perf_counter() - started)
        rescore = statistics.median(rescores)
        del scorer
        found = epochs(args.model, data, Path(folder) / "history", settings, selection, args.repeats)
    print(f"model {args.model.name}, {args.samples} samples ({found['tokens']} tokens), {found['steps']} steps of "
          f"{args.batch_size} (micro-batches of {args.micro_batch_size}), LoRA r {args.lora_r}, {torch.get_num_threads()} "
          f"threads, {found['kept']} kept tokens per epoch")
    print(f"(a) online epoch {found['online']:.2f} s vs masked epoch {found['masked']:.2f} s (same kept tokens): "
          f"{found['online'] / found['masked']:.3f}x (target <= 1.15x)")
    offline = rescore + found["masked"]
    print(f"(b) online round {found['online']:.2f} s vs offline round {offline:.2f} s (rescoring with cached history "
          f"{rescore:.2f} s + masked epoch {found['masked']:.2f} s): {found['online'] / offline:.3f}x; the offline "
          f"round costs {offline / found['masked']:.3f}x its training")


if __name__ == "__main__":
    main()
