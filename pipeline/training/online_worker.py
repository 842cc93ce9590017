"""The online side of a training rank: its samples, each step's selecting loss, and each step's mask shard.

`run_rank` (pipeline.training.train_worker) asks a feed for the index its data plan orders, then per step for
the micro-batches and the loss to train them with, and after the optimizer step lets the feed keep what the step
made. The online feed (this module) reads tokenized rows with their cached history NLLs, gives an `OnlineLoss`
(attention-only during the warm-up steps), and commits the step's selections as one masks.v1 shard,
`part-step-NNNNNNNN.parquet` with the step in its `step` column, through the exactly-once commit
(`pipeline.runtime.stage_output.commit_shard`: temporary name, record, rename). A shard is committed before the
checkpoint of its step is reported, so a resumed run finds every mask of the steps it does not redo, and the
steps it redoes select the same tokens (same weights, same batch) and commit the same bytes again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.runtime.stage_output import commit_shard
from pipeline.scoring.attention import register_importance_attention
from pipeline.scoring.device_budget import GPU_MAX_CHUNK_ELEMENTS
from pipeline.scoring.scorer import layer_index
from pipeline.scoring.signal_forward import ForwardOptions
from pipeline.training.online_data import OnlineRow, load_online_samples, online_index, open_online_data
from pipeline.training.online_history import MovingHistory
from pipeline.training.online_settings import OnlineSettings
from pipeline.training.online_step import OnlineLoss, online_micro_batch, selection_mask_table
from pipeline.training.training_data import DataPlan, SampleIndex


# A resumable state's file of the moving history (previous, ema), beside the trainer's (pipeline.training.finetune).
HISTORY_STATE = "online_history.safetensors"


def step_shard(step: int) -> str:
    """The mask shard of optimizer step `step` (1-based)."""
    return f"part-step-{step:08d}.parquet"


@dataclass(frozen=True)
class OnlineJob:
    """What an online rank needs besides the RankJob, as plain values: the settings (OnlineSettings as a dict),
    the history cache folder of this data (None: no REL), the masks folder its shards go to and their run key."""

    settings: dict[str, Any]
    history: str | None
    masks: str
    run_key: str

    def online_settings(self) -> OnlineSettings:
        return OnlineSettings(**self.settings)


class OnlineFeed:
    """Samples with targets, in the masked trainer's order; per step an OnlineLoss; per step a mask shard."""

    def __init__(self, job: OnlineJob, data: Path, batch_size: int):
        self.job = job
        self.settings = job.online_settings()
        self.source = open_online_data(data, None if job.history is None else Path(job.history))
        self.index: SampleIndex = online_index(self.source)
        self.warmup = self.settings.warmup_steps(batch_size)
        self.rows: dict[int, OnlineRow] = {}
        self.options = ForwardOptions()

    def prepare(self, plan: DataPlan, rank: int, start: int, tuned: Any, device: torch.device, resume: Path | None) -> None:
        """Read this rank's rows of the steps still to run; run the model with the importance attention; the moving
        history (previous, ema) from the trained weights, or from the resumed state."""
        model = tuned.model
        wanted = [p for step in range(start, plan.steps) for batch in plan.micro_batches(step, rank, self.index.lengths)
                  for p in batch]
        self.rows = load_online_samples(self.source, self.index, np.asarray(wanted, dtype=np.int64))
        importance = self.settings.uses_attention or self.warmup > 0
        layer = layer_index(model, self.settings.layer, "the model being trained") if importance else None
        if importance:
            model.set_attn_implementation(register_importance_attention())
        chunk = GPU_MAX_CHUNK_ELEMENTS if device.type == "cuda" else self.options.logit_chunk_elements
        self.options = ForwardOptions(layer_idx=layer, entropy=self.settings.uses_entropy, logit_chunk_elements=chunk)
        self.device, self.tuned = device, tuned
        self.history = None
        if self.settings.moving_history:
            self.history = MovingHistory(self.settings.history_policy, self.settings.history_every,
                                         self.settings.ema_alpha, tuned.named_trainable())
            if resume is not None:
                self.history.load(load_file(str(Path(resume) / HISTORY_STATE)))

    def step(self, step: int, positions: list[np.ndarray]) -> tuple[list[Any], OnlineLoss]:
        """Step `step`'s (0-based) micro-batches and the loss that selects in their forward."""
        settings = self.settings.select_settings()
        if step < self.warmup:
            settings = settings.model_copy(update={"method": "attn"})
        batches = [online_micro_batch([self.rows[int(p)] for p in batch]) for batch in positions]
        return batches, OnlineLoss(settings, self.options, self.device, self.settings.excess, self.history)

    def after(self, step: int, loss: OnlineLoss, rank: int) -> None:
        """Commit the selections optimizer step `step` (1-based) trained on; move the history on."""
        if rank == 0:
            commit_shard(Path(self.job.masks), step_shard(step), selection_mask_table(loss.selected, step),
                         {"run_key": self.job.run_key, "step": step, "warnings": loss.warnings})
        if self.history is not None:
            self.history.update(step, self.tuned.named_trainable())

    def save(self, folder: Path) -> None:
        """What a resumable checkpoint keeps besides the trainer's state: the moving history's weights."""
        if self.history is not None:
            save_file(self.history.state(), str(Path(folder) / HISTORY_STATE))
