"""One training rank: reads its own micro-batches, runs the steps, logs metrics and reports checkpoints.

`run_rank` knows nothing of Ray: it gets its rank, the world size, a folder to resume from (or
None) and a `report(metrics, checkpoint_folder_or_None)` callback. `ray_train_loop` is the Ray
Train v2 `train_loop_per_worker` that wires them to `ray.train.get_context`, `get_checkpoint` and
`report`; tests run `run_rank` in-process.

Determinism, so that a killed run resumed from ANY of its checkpoints ends with the same tensors:
the data order is a pure function of (seed, epoch) (`pipeline.training.training_data.DataPlan`),
the learning rate a pure function of the step, torch is seeded per (seed, step, rank) before each
step (LoRA dropout), and a checkpoint holds the trainable weights, the AdamW moments and the step.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.runtime.errors import UserError
from pipeline.scoring.batching import right_padded
from pipeline.training.finetune import FineTuned
from pipeline.training.masked_loss import IGNORE_INDEX, masked_labels
from pipeline.training.train_metrics import rewind_metrics
from pipeline.training.train_settings import TrainSettings, learning_rate, warmup_steps
from pipeline.training.online_worker import OnlineFeed, OnlineJob
from pipeline.training.train_step import (
    MASKED, MaskedLoss, MicroBatch, StepResult, autocast_precision, step_seed, train_step,
)
from pipeline.training.training_data import DataPlan, SampleIndex, SampleRow, build_index, load_samples, open_training_data

# The rank-0 folder the final Hugging Face checkpoint is written to (renamed from FINAL_PARTIAL when complete).
FINAL = "final"
FINAL_PARTIAL = "final-partial"

Report = Callable[[dict[str, Any], "Path | None"], None]


def refuse_non_finite(step: int, result: StepResult, lr: float) -> None:
    """Stop at the first step whose loss or gradient norm is NaN or infinite, naming it: the run stops before that
    step is logged or any checkpoint of it is kept."""
    if math.isfinite(result.loss) and math.isfinite(result.grad_norm):
        return
    raise UserError(
        f"training diverged at step {step}: loss {result.loss}, gradient norm {result.grad_norm} (learning rate "
        f"{lr:.3g}); lower --lr, or check the starting model's weights for NaN or infinite values; nothing of this "
        "step was kept"
    )


def _refuse_non_finite_weights(tuned: FineTuned, step: int) -> None:
    """The trained weights are finite before they are saved (a last step can overflow them with a finite loss)."""
    for name, parameter in tuned.model.named_parameters():
        if parameter.requires_grad and not bool(torch.isfinite(parameter).all()):
            raise UserError(
                f"training diverged: after step {step} the weights {name} hold NaN or infinite values; lower --lr; "
                "no checkpoint was written"
            )


@dataclass(frozen=True)
class RankJob:
    """What every rank needs, as plain values (it travels to Ray workers)."""

    data: str
    masks: str
    model: str
    metrics: str  # OUTPUT/metrics.jsonl (rank 0 writes it)
    work: str  # OUTPUT/train: the final checkpoint is written under it
    settings: dict[str, Any]
    workers: int
    threads: int | None = None
    use_gpu: bool = False
    trust_remote_code: bool = False
    online: dict[str, Any] | None = None  # selection online: an OnlineJob as a dict (masks is then unused)

    def train_settings(self) -> TrainSettings:
        return TrainSettings(**self.settings)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule_of(settings: TrainSettings, steps: int) -> tuple[int, int]:
    """(total steps, warm-up steps) of the learning-rate schedule this run is part of."""
    total = settings.schedule_total_steps or settings.schedule_start_step + steps
    return total, warmup_steps(total, settings.warmup_ratio)


def micro_batch(rows: dict[int, tuple[np.ndarray, ...]], positions: np.ndarray) -> MicroBatch:
    """The right-padded micro-batch of `rows` (input_ids, keep[, weight]) at `positions`; without weights (or with
    `load_samples`' rows) each kept token weighs 1; weights are 0 off the kept tokens and on padding."""
    samples = [rows[int(p)] for p in positions]
    input_ids, attention_mask = right_padded([s[0] for s in samples])
    keep_mask, _ = right_padded([s[1].astype(np.int64) for s in samples])
    labels = masked_labels(input_ids, keep_mask.bool())
    weights = None
    if all(len(s) > 2 for s in samples):
        padded = torch.zeros(labels.shape, dtype=torch.float32)
        for row, sample in enumerate(samples):
            padded[row, : len(sample[2])] = torch.from_numpy(np.asarray(sample[2], dtype=np.float32))
        weights = torch.where(labels != IGNORE_INDEX, padded, torch.zeros_like(padded))
    return MicroBatch(input_ids, attention_mask, labels, weights)


def run_rank(job: RankJob, rank: int, world: int, resume: Path | None, report: Report, device: torch.device) -> None:
    """Train from `resume` (or the start) to the plan's last step; rank 0 writes metrics and the final folder."""
    if job.threads and device.type == "cpu":
        torch.set_num_threads(job.threads)
    settings = job.train_settings()
    feed = OnlineFeed(OnlineJob(**job.online), Path(job.data), settings.batch_size) if job.online else MaskedFeed(job)
    index = feed.index
    plan = DataPlan(index.samples, settings.batch_size, settings.micro_batch_size, world, settings.seed, settings.epochs)
    total, warmup = schedule_of(settings, plan.steps)
    tuned = FineTuned(job.model, settings, device, trust_remote_code=job.trust_remote_code)
    optimizer = tuned.optimizer()
    step = tuned.load_state(resume, optimizer) if resume is not None else 0
    metrics_path = Path(job.metrics)
    if rank == 0:
        rewind_metrics(metrics_path, step)  # a resumed run logs the later steps again; a torn tail goes
    feed.prepare(plan, rank, step, tuned, device, resume)
    precision = autocast_precision(settings.dtype, device)
    while step < plan.steps:
        batches, loss = feed.step(step, plan.micro_batches(step, rank, index.lengths))
        torch.manual_seed(step_seed(settings.seed, step, rank))
        lr = learning_rate(settings.schedule_start_step + step, settings.lr, total, warmup)
        started = time.monotonic()
        result = train_step(tuned.model, optimizer, batches, lr, settings.max_grad_norm, precision, loss)
        seconds = time.monotonic() - started
        step += 1
        refuse_non_finite(step, result, lr)
        feed.after(step, loss, rank)
        metrics = {
            "step": step,
            "loss": result.loss,
            "kept_tokens": result.kept_tokens,
            "tokens": result.tokens,
            "tokens_per_s": result.tokens / max(seconds, 1e-9),
            "lr": lr,
            "grad_norm": result.grad_norm,
            "seconds": seconds,
        }
        if rank == 0:
            with metrics_path.open("a") as log:
                log.write(json.dumps(metrics, allow_nan=False) + "\n")
        if step % settings.checkpoint_every == 0 or step == plan.steps:
            _refuse_non_finite_weights(tuned, step)
            _report_checkpoint(tuned, optimizer, step, rank, metrics, report, feed.save)
    if rank == 0:
        _write_final(tuned, job)


class MaskedFeed:
    """Training on masks selected offline: the samples with kept tokens, their micro-batches, the masked loss."""

    def __init__(self, job: RankJob):
        self.source = open_training_data(Path(job.data), Path(job.masks))
        self.index: SampleIndex = build_index(self.source)
        self.rows: dict[int, SampleRow] = {}

    def prepare(self, plan: DataPlan, rank: int, start: int, tuned: FineTuned, device: torch.device,
                resume: Path | None) -> None:
        """This rank's samples for the steps still to run, read from the shards once."""
        wanted = [p for step in range(start, plan.steps) for batch in plan.micro_batches(step, rank, self.index.lengths)
                  for p in batch]
        self.rows = load_samples(self.source, self.index, np.asarray(wanted, dtype=np.int64))
        self.device = device

    def step(self, step: int, positions: list[np.ndarray]) -> tuple[list[MicroBatch], MaskedLoss]:
        return [micro_batch(self.rows, p).to(self.device) for p in positions], MASKED

    def after(self, step: int, loss: MaskedLoss, rank: int) -> None:
        """Nothing to keep: the masks were written before training."""

    def save(self, folder: Path) -> None:
        """Nothing beside the trainer's state."""


def _report_checkpoint(tuned: FineTuned, optimizer, step: int, rank: int, metrics: dict[str, Any], report: Report,
                       save_more: Callable[[Path], None]) -> None:
    """Every rank reports (a barrier); rank 0 attaches the resumable state (identical on every rank): the trainer's,
    and what the feed keeps (`save_more`: online selection's moving history)."""
    if rank != 0:
        report(metrics, None)
        return
    folder = Path(tempfile.mkdtemp(prefix="sstoken-train-state-"))
    try:
        tuned.save_state(folder, optimizer, step)
        save_more(folder)
        report(metrics, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _write_final(tuned: FineTuned, job: RankJob) -> None:
    """The final Hugging Face folder under OUTPUT/train/, complete before it takes its name."""
    partial, final = Path(job.work) / FINAL_PARTIAL, Path(job.work) / FINAL
    shutil.rmtree(partial, ignore_errors=True)
    tuned.save_pretrained(partial, Path(job.model), trust_remote_code=job.trust_remote_code)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


def ray_train_loop(spec: dict[str, Any]) -> None:
    """Ray Train v2 `train_loop_per_worker`: this worker's rank, resume checkpoint and report, then `run_rank`."""
    import ray.train
    import ray.train.torch
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would reach the job's log
    context = ray.train.get_context()
    job = RankJob(**spec)
    device = ray.train.torch.get_device() if job.use_gpu else torch.device("cpu")

    def report(metrics: dict[str, Any], folder: Path | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(str(folder)) if folder is not None else None
        ray.train.report(metrics, checkpoint=checkpoint)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        run_rank(job, context.get_world_rank(), context.get_world_size(), None, report, device)
        return
    with checkpoint.as_directory() as folder:
        resume = Path(tempfile.mkdtemp(prefix="sstoken-train-resume-"))
        shutil.copytree(folder, resume, dirs_exist_ok=True)
    try:
        run_rank(job, context.get_world_rank(), context.get_world_size(), resume, report, device)
    finally:
        shutil.rmtree(resume, ignore_errors=True)
