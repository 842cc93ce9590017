"""The model being fine-tuned: loading it (full or LoRA), its optimizer, its resumable state and its final folder.

Resumable state (a folder, safetensors only, no pickle):
- `trainable.safetensors`: every trainable parameter by name (the LoRA adapters, or every weight);
- `optimizer.safetensors`: AdamW's `exp_avg`, `exp_avg_sq` and `step` per parameter name;
- `state.json`: the optimizer steps done. The learning rate is a pure function of the step
  (`train_settings.learning_rate`), so the step is the whole scheduler state.
A run resumed from such a folder continues with exactly the tensors an uninterrupted run has.

The final checkpoint is a Hugging Face folder: safetensors weights (LoRA merged into them),
config.json and the tokenizer, loadable by `pipeline.runtime.checkpoints.load_model` and the scorer.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pipeline.runtime.checkpoints import load_model, load_tokenizer
from pipeline.training.train_settings import TrainSettings

TRAINABLE = "trainable.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "step")


class FineTuned:
    """The model under training: `model` is the Hugging Face causal LM the step runs (LoRA layers
    injected when `finetune` is lora); `wrapper` is the peft model to merge, or None."""

    def __init__(self, checkpoint: Path | str, settings: TrainSettings, device: torch.device, trust_remote_code: bool = False):
        self.settings = settings
        model = load_model(checkpoint, torch.float32, "cpu", trust_remote_code=trust_remote_code)
        self.wrapper: Any = None
        if settings.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            targets = settings.lora_targets
            lora = LoraConfig(
                r=settings.lora_r,
                lora_alpha=settings.lora_alpha,
                lora_dropout=settings.lora_dropout,
                target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                task_type="CAUSAL_LM",
            )
            torch.manual_seed(settings.seed)  # the adapters' initialisation: the same on every rank and every run
            with warnings.catch_warnings():  # peft asks transformers a deprecated question; not the user's concern
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                self.wrapper = get_peft_model(model, lora)
            model = self.wrapper.get_base_model()
        self.model = model.to(device).train()

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.model.named_parameters() if p.requires_grad}

    def optimizer(self) -> torch.optim.AdamW:
        """AdamW over the trainable parameters (the learning rate is set before every step)."""
        return torch.optim.AdamW(
            list(self.named_trainable().values()), lr=self.settings.lr, weight_decay=self.settings.weight_decay
        )

    def save_state(self, folder: Path, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Trainable weights, optimizer moments and the step, into `folder` (created)."""
        folder.mkdir(parents=True, exist_ok=True)
        trainable = self.named_trainable()
        save_file({name: p.detach().cpu().contiguous() for name, p in trainable.items()}, str(folder / TRAINABLE))
        moments = {}
        for name, parameter in trainable.items():
            for key, value in optimizer.state.get(parameter, {}).items():
                moments[f"{name}::{key}"] = value.detach().cpu().contiguous().clone()
        save_file(moments, str(folder / OPTIMIZER))
        (folder / STATE).write_text(json.dumps({"step": step}) + "\n")

    def load_state(self, folder: Path, optimizer: torch.optim.Optimizer) -> int:
        """Restore what `save_state` wrote; returns the steps done."""
        weights = load_file(str(folder / TRAINABLE))
        moments = load_file(str(folder / OPTIMIZER))
        trainable = self.named_trainable()
        if set(weights) != set(trainable):
            raise ValueError(f"resumable state in {folder} holds other parameters than this model trains")
        with torch.no_grad():
            for name, parameter in trainable.items():
                parameter.copy_(weights[name])
                state = {key: moments[f"{name}::{key}"] for key in _ADAM_KEYS if f"{name}::{key}" in moments}
                if state:
                    optimizer.state[parameter] = {k: v.to(parameter.device) if k != "step" else v for k, v in state.items()}
        return int(json.loads((folder / STATE).read_text())["step"])

    def save_pretrained(self, folder: Path, tokenizer_source: Path, trust_remote_code: bool = False) -> None:
        """The final Hugging Face folder: LoRA merged into the weights, safetensors, config and tokenizer."""
        model = self.wrapper.merge_and_unload() if self.wrapper is not None else self.model
        model.to("cpu").save_pretrained(folder, safe_serialization=True)
        load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code).save_pretrained(folder)
