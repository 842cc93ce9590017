"""Benchmark: our SFT step and trainer on SmolLM2-135M, side by side in one process run.

    python tests/benchmarks/bench_train.py             # a few minutes on 2 CPU cores
    python tests/benchmarks/bench_train.py --steps 2   # quicker, noisier

Not collected by pytest. Prints:
(a) the masked training step (loss on the kept tokens of a selection) against the same step
    unmasked (loss on every trainable token, plain SFT): same model, same micro-batches, same
    optimizer, interleaved repeats, median seconds per step; target: masked / unmasked <= 1.05;
(b) our trainer's tokens/s (the per-rank loop the Ray Train worker runs, `run_rank`, in-process,
    Ray start-up excluded) against TRL's SFTTrainer on the same data (input_ids and the same masked
    labels), model, LoRA settings, batch and accumulation; both count the tokens of the optimizer
    steps (padding excluded) over the seconds of those steps (model loading and set-up excluded);
    target: ours / TRL >= 1.0. TRL 1.16 on CPU: bf16 and gradient checkpointing off, and
    `skip_prepare_dataset` so it keeps our labels as they are (field notes);
(c) a round's rescoring with the history NLLs cached (the score stage's current pass: NLL and
    attention importance, then the per-sample selection, `scoring.scorer.score_shard` with the
    history table given) against the same round's training (b's seconds of optimizer steps over the
    same samples, one epoch); model loading and Ray start-up excluded on both sides;
    target: rescoring / training <= 0.4.
The data: a tokenized corpus built with the model's tokenizer (tests/factories.py, longer texts),
keep masks keeping each trainable token with probability 0.6.
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
from pipeline.training.finetune import FineTuned  # noqa: E402
from pipeline.training.masked_loss import masked_labels  # noqa: E402
from pipeline.training.train_settings import TrainSettings, warmup_steps  # noqa: E402
from pipeline.training.train_step import train_step  # noqa: E402
from pipeline.training.train_worker import RankJob, micro_batch, run_rank  # noqa: E402
from pipeline.training.training_data import DataPlan, build_index, load_samples, open_training_data  # noqa: E402
from tests.factories import write_keep_masks, write_tokenized  # noqa: E402

MODEL = Path(os.environ.get("SSTOKEN_CACHE", Path.home() / ".cache" / "sstoken")) / "models" / "smollm2-135m"
CPU = torch.device("cpu")


def build_inputs(folder: Path, samples: int) -> tuple[Path, Path]:
    tokenizer = load_tokenizer(MODEL)
    data = write_tokenized(folder / "tokenized", tokenizer, [samples], seed=1, scale=3)
    return data, write_keep_masks(folder / "masks", data, ratio=0.6, seed=2)


def masked_vs_unmasked(data: Path, masks: Path, settings: TrainSettings, repeats: int) -> dict[str, float]:
    """Median seconds of one optimizer step with kept-token labels and with every trainable token."""
    import pyarrow.parquet as pq

    source = open_training_data(data, masks)
    index = build_index(source)
    plan = DataPlan(index.samples, settings.batch_size, settings.micro_batch_size, 1, settings.seed, 1.0)
    positions = plan.micro_batches(0, 0, index.lengths)
    rows = load_samples(source, index, np.concatenate(positions))
    trainable = {
        row["sample_id"]: np.asarray(row["trainable"], dtype=bool)
        for row in pq.read_table(data / "part-00000.parquet", columns=["sample_id", "trainable"]).to_pylist()
    }
    masked = [micro_batch(rows, p) for p in positions]
    unmasked = [
        micro_batch({int(q): (rows[int(q)][0], trainable[index.sample_ids[int(q)]]) for q in p}, p) for p in positions
    ]
    tuned = FineTuned(MODEL, settings, CPU)
    optimizer = tuned.optimizer()
    times: dict[str, list[float]] = {"masked": [], "unmasked": []}
    train_step(tuned.model, optimizer, masked, 1e-5, 1.0)  # warm-up
    for _ in range(repeats):
        for name, batches in (("masked", masked), ("unmasked", unmasked)):
            started = time.perf_counter()
            train_step(tuned.model, optimizer, batches, 1e-5, 1.0)
            times[name].append(time.perf_counter() - started)
    kept = sum(int((b.labels != -100).sum()) for b in masked)
    every = sum(int((b.labels != -100).sum()) for b in unmasked)
    return {
        "masked_s": statistics.median(times["masked"]),
        "unmasked_s": statistics.median(times["unmasked"]),
        "kept_tokens": kept,
        "trainable_tokens": every,
        "tokens": sum(b.tokens for b in masked),
    }


def ours(data: Path, masks: Path, settings: TrainSettings, folder: Path) -> dict[str, float]:
    """tokens/s of the per-rank training loop, from its metrics (seconds of the optimizer steps)."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    job = RankJob(str(data), str(masks), str(MODEL), str(folder / "metrics.jsonl"), str(folder), settings.model_dump(), 1)
    started = time.perf_counter()
    run_rank(job, 0, 1, None, lambda metrics, checkpoint: None, CPU)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    tokens, seconds = sum(m["tokens"] for m in lines), sum(m["seconds"] for m in lines)
    return {"steps": len(lines), "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "wall_s": wall}


def trl_sft(data: Path, masks: Path, settings: TrainSettings, steps: int, folder: Path) -> dict[str, float]:
    """tokens/s of TRL's SFTTrainer on the same samples and labels, timed per optimizer step by a callback."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    source = open_training_data(data, masks)
    index = build_index(source)
    rows = load_samples(source, index, np.arange(index.samples))
    records = []
    for position in range(index.samples):
        ids, keep, _ = rows[position]
        labels = masked_labels(torch.as_tensor(ids)[None], torch.as_tensor(keep)[None])[0]
        records.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    dataset = Dataset.from_list(records)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds = 0.0
            self.started = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds += time.perf_counter() - self.started

    clock = StepClock()
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    config = SFTConfig(
        output_dir=str(folder),
        per_device_train_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch_size,
        max_steps=steps,
        learning_rate=settings.lr,
        warmup_steps=warmup_steps(steps, settings.warmup_ratio),
        lr_scheduler_type="linear",
        max_grad_norm=settings.max_grad_norm,
        weight_decay=settings.weight_decay,
        seed=settings.seed,
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
        target_modules=settings.lora_targets, task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=load_tokenizer(MODEL),
                         peft_config=lora, callbacks=[clock])
    tokens = {"count": 0}
    collate = trainer.data_collator

    def counting_collator(examples):  # the samples' own lengths, before TRL pads them
        tokens["count"] += sum(len(example["input_ids"]) for example in examples)
        return collate(examples)

    trainer.data_collator = counting_collator
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {"steps": steps, "tokens": tokens["count"], "seconds": clock.seconds,
            "tokens_per_s": tokens["count"] / clock.seconds, "wall_s": wall}


def rescoring(data: Path, threads: int | None) -> dict[str, float]:
    """Seconds of the current pass over the corpus with the history NLLs already cached (round r > 0)."""
    from pipeline.runtime.files import read_shard
    from pipeline.scoring.score_settings import ScoreSettings
    from pipeline.scoring.scorer import Scorer, nll_table, score_shard
    from pipeline.selection.select_settings import SelectSettings

    tokenized = read_shard(data / "part-00000.parquet", "tokenized")
    scorer = Scorer(MODEL, ScoreSettings(threads=threads), importance=True)
    history = nll_table(scorer, tokenized)  # what the cache holds (not timed: a cached round never computes it)
    started = time.perf_counter()
    score_shard(scorer, tokenized, SelectSettings(), history_nll=history)
    return {"seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps of each trainer")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the masked/unmasked step")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's); on a shared machine fewer threads than cores avoid "
                        "oversubscription, which slows every step many times over")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if not MODEL.is_dir():
        sys.exit(f"{MODEL} is missing: run `sstoken models fetch smollm2-135m` first")
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        samples = arguments.steps * arguments.batch_size
        data, masks = build_inputs(folder, samples)
        settings = TrainSettings(batch_size=arguments.batch_size, micro_batch_size=arguments.micro_batch_size,
                                 lora_dropout=0.0, epochs=1.0)
        print(f"SmolLM2-135M, LoRA r={settings.lora_r} all-linear, float32 on CPU, {torch.get_num_threads()} torch thread(s), "
              f"batch {settings.batch_size} = {settings.batch_size // settings.micro_batch_size} x micro-batch "
              f"{settings.micro_batch_size}, {samples} samples")
        step = masked_vs_unmasked(data, masks, settings, arguments.repeats)
        ratio = step["masked_s"] / step["unmasked_s"]
        print(f"(a) one optimizer step ({step['tokens']} tokens): masked ({step['kept_tokens']} kept) "
              f"{step['masked_s']:.2f} s, unmasked ({step['trainable_tokens']} trainable) {step['unmasked_s']:.2f} s: "
              f"{ratio:.3f}x (target <= 1.05)")
        ours_figures = ours(data, masks, settings, folder / "ours")
        trl_figures = trl_sft(data, masks, settings, ours_figures["steps"], folder / "trl")
        speed = ours_figures["tokens_per_s"] / trl_figures["tokens_per_s"]
        for name, figures in (("ours", ours_figures), ("TRL SFTTrainer", trl_figures)):
            print(f"(b) {name}: {figures['steps']} steps, {figures['tokens']} tokens in {figures['seconds']:.1f} s of "
                  f"steps = {figures['tokens_per_s']:.0f} tokens/s (wall {figures['wall_s']:.1f} s with set-up)")
        print(f"(b) ours / TRL: {speed:.2f}x (target >= 1.0)")
        rescored = rescoring(data, arguments.threads)
        share = rescored["seconds"] / ours_figures["seconds"]
        print(f"(c) a round over the same {samples} samples: rescoring with the history cached {rescored['seconds']:.1f} s, "
              f"training (one epoch) {ours_figures['seconds']:.1f} s: {share:.2f}x (target <= 0.4)")


if __name__ == "__main__":
    main()
