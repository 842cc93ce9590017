"""The history model of an online run whose history moves with training: previous, or an EMA of the weights.

    history = MovingHistory(policy, every, alpha, tuned.named_trainable())
    nll = history.nll(model, plan, device)        # per target of the micro-batch, no-grad, the history weights swapped in
    history.update(step, tuned.named_trainable()) # after optimizer step `step` (1-based): refreshed every `every` steps
    history.state() / history.load(state)         # saved with each resumable checkpoint, so a resumed run selects alike

Only the trained weights differ between the history and the model being trained (the frozen base is shared), so
the history is a copy of those tensors (LoRA: the adapters; full fine-tuning: every weight), swapped into the
model for a no-grad, eval-mode forward (`signal_forward`, no importance) and swapped back before the step's own.
- previous: the weights `every` steps before the current ones, refreshed at each multiple of `every`: until the
  first refresh, the starting weights (REL is then noise and the REL guard selects attention-only).
- ema: `alpha * history + (1 - alpha) * current` every `every` steps from the starting weights
  (`pipeline.runtime.weight_average`, the offline loop's average). With LoRA the adapters' factors are averaged,
  which is not the average of their product: the offline loop's EMA (of merged checkpoints) differs there.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from pipeline.runtime.weight_average import average_tensor
from pipeline.scoring.scoring_batch import ScoringBatch
from pipeline.scoring.signal_forward import ForwardOptions, signal_forward

Weights = dict[str, torch.Tensor]


def _copy(parameters: dict[str, torch.nn.Parameter]) -> Weights:
    return {name: p.detach().clone() for name, p in parameters.items()}


class MovingHistory:
    """The previous or EMA history weights of an online run."""

    def __init__(self, policy: str, every: int, alpha: float, parameters: dict[str, torch.nn.Parameter]):
        if policy not in ("previous", "ema"):
            raise ValueError(f"a moving history is previous or ema, not {policy}")
        self.policy, self.every, self.alpha = policy, every, alpha
        self.weights = _copy(parameters)  # what the history forward runs
        self.pending = _copy(parameters) if policy == "previous" else {}  # previous: the weights it becomes next

    def update(self, step: int, parameters: dict[str, torch.nn.Parameter]) -> None:
        """After optimizer step `step` (1-based): at each multiple of `every`, move the history on."""
        if step % self.every:
            return
        if self.policy == "previous":
            self.weights, self.pending = self.pending, _copy(parameters)
            return
        self.weights = {name: average_tensor(self.weights[name], p.detach(), self.alpha) for name, p in parameters.items()}

    @contextmanager
    def swapped_in(self, model: torch.nn.Module) -> Iterator[None]:
        """The history weights in the model (eval mode, no grad), the trained ones back afterwards."""
        parameters = dict(model.named_parameters())
        kept = {name: parameters[name].detach().clone() for name in self.weights}
        training = model.training
        with torch.no_grad():
            for name, value in self.weights.items():
                parameters[name].copy_(value)
            model.eval()
            try:
                yield
            finally:
                for name, value in kept.items():
                    parameters[name].copy_(value)
                model.train(training)

    def nll(self, model: Any, plan: ScoringBatch, device: torch.device, chunk: int) -> torch.Tensor:
        """The history weights' NLL of every target of the micro-batch (row-major, fp32, no graph)."""
        with self.swapped_in(model), torch.no_grad():
            nll, _, _ = signal_forward(model, plan, device, ForwardOptions(logit_chunk_elements=chunk))
        return nll

    def state(self) -> Weights:
        """What a resumable checkpoint keeps of it (safetensors-ready: names without dots' ambiguity)."""
        state = {f"history::{name}": value.contiguous() for name, value in self.weights.items()}
        return state | {f"pending::{name}": value.contiguous() for name, value in self.pending.items()}

    def load(self, state: Weights) -> None:
        """Restore what `state` gave (every tensor of this run's trained weights must be there)."""
        for part, target in (("history", self.weights), ("pending", self.pending)):
            for name in target:
                key = f"{part}::{name}"
                if key not in state:
                    raise ValueError(f"the resumable state lacks the {self.policy} history tensor {name}")
                target[name] = state[key].to(target[name].device)
