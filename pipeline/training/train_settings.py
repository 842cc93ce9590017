"""How a model is fine-tuned on kept tokens: the train stage's settings, free of torch so configs load fast.

`sstoken train` and a run config's `train:` section fill this one model; the trainer that uses it
(pipeline/training/train_step.py, pipeline/training/train_worker.py) is imported only when training runs.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from pipeline.runtime.config import StageConfig, setting


class TrainSettings(StageConfig):
    """Optimiser, schedule, batch and LoRA settings of the SFT stage (loss on kept tokens only)."""

    lr: float = Field(1e-4, gt=0, description="Peak learning rate of AdamW.")
    warmup_ratio: float = Field(
        0.03, ge=0, le=1, description="Share of the schedule's steps spent warming the learning rate up linearly from 0."
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the samples that have kept tokens (fractions allowed).")
    batch_size: int = Field(
        8, ge=1, description="Global batch in samples per optimizer step (all ranks and accumulation micro-batches)."
    )
    micro_batch_size: int = Field(
        4, ge=1, description="Samples per rank per forward; gradient accumulation = batch_size / (micro_batch_size x workers)."
    )
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm to this (none: no clipping).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, ge=0, description="Seed of the data order, LoRA initialisation and dropout.")
    finetune: Literal["lora", "full"] = Field(
        "lora", description="lora: train low-rank adapters (peft) and save the merged model; full: train every weight."
    )
    lora_r: int = Field(64, ge=1, description="LoRA rank.")
    lora_alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    lora_dropout: float = Field(0.1, ge=0, lt=1, description="Dropout on the LoRA branch's input.")
    lora_targets: str = Field(
        "all-linear", description="Modules that get adapters: all-linear (every Linear but the LM head) or comma-separated names."
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="auto: bf16 autocast on GPU, float32 on CPU; float32; bfloat16 (autocast, float32 master weights)."
    )
    checkpoint_every: int = setting(
        20, ge=1, description="Optimizer steps between resumable checkpoints (a killed run resumes from the last).",
        run_key=False,
    )
    schedule_start_step: int = Field(
        0, ge=0, description="Position of this run's first step in the learning-rate schedule (rounds sharing one schedule)."
    )
    schedule_total_steps: int | None = Field(
        None, ge=1, description="Length of the learning-rate schedule in steps; default: this run's own steps.",
    )

    @model_validator(mode="after")
    def _micro_batch_fits(self) -> TrainSettings:
        if self.micro_batch_size > self.batch_size:
            raise ValueError(f"micro_batch_size {self.micro_batch_size} exceeds batch_size {self.batch_size}")
        return self

    def train_settings(self) -> TrainSettings:
        """These settings alone (a config that extends them drops its other fields)."""
        return TrainSettings(**{name: getattr(self, name) for name in TrainSettings.model_fields})


def accumulation_steps(batch_size: int, micro_batch_size: int, workers: int) -> int:
    """Micro-batches each rank accumulates per optimizer step; ValueError when the batch does not divide."""
    per_step = micro_batch_size * workers
    if batch_size % per_step:
        raise ValueError(
            f"batch_size {batch_size} is not a multiple of micro_batch_size {micro_batch_size} x workers {workers} "
            f"= {per_step}; choose a batch_size that is (e.g. {per_step * max(1, round(batch_size / per_step))})"
        )
    return batch_size // per_step


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Warm-up length of a schedule, as transformers' TrainingArguments derives it from a ratio."""
    return math.ceil(total_steps * warmup_ratio)


def learning_rate(step: int, peak: float, total_steps: int, warmup: int) -> float:
    """Linear warm-up from 0 to `peak`, then linear decay to 0 at `total_steps`: the learning rate of the
    optimizer step with 0-based index `step` (transformers' get_linear_schedule_with_warmup, as a pure
    function, so a resumed run or a later round needs only the step to know its rate)."""
    if step < warmup:
        return peak * step / max(1, warmup)
    return peak * max(0.0, (total_steps - step) / max(1, total_steps - warmup))
