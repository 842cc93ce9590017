"""One optimizer step of SFT on kept tokens: forward, masked NLL sum, backward, gradient sum, AdamW.

    result = train_step(model, optimizer, micro_batches, lr=..., max_grad_norm=1.0)

Every micro-batch's loss is `weighted NLL sum / weight total of the global batch`
(pipeline.training.masked_loss; with every kept token weighing 1, `NLL sum / kept tokens`), so summing
gradients over accumulation micro-batches and over ranks gives the gradient of
sum(w_i * nll_i) / sum(w_i) over the global batch's kept tokens. Across ranks the gradients are summed with one all-reduce
after accumulation instead of DistributedDataParallel: DDP AVERAGES over ranks (which would divide
by the world size a second time) and syncs only when the forward runs through its wrapper, while
this step calls the decoder and the head separately. One flat all-reduce per step costs the same
bytes; it does not overlap with the backward, which at the sizes this runs on does not matter.

Nothing here knows about Ray: the same step runs in a Ray Train worker, in a test that plays two
ranks by hand, and in the benchmark that times a masked step against an unmasked one.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.distributed as dist

from pipeline.training.masked_loss import kept_count, masked_nll_sum, target_weight


@dataclass
class MicroBatch:
    """One rank's forward: right-padded ids, attention mask and labels (IGNORE_INDEX off the kept tokens), and the
    kept tokens' loss weights (float32, 0 elsewhere; None: each weighs 1)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None

    def to(self, device: torch.device) -> MicroBatch:
        weights = None if self.weights is None else self.weights.to(device)
        return MicroBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device), weights)

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step did, over the whole global batch (all ranks)."""

    loss: float  # sum(w_i * nll_i) / sum(w_i) over the global batch's kept tokens (their mean NLL when all w_i are 1)
    kept_tokens: int
    tokens: int  # tokens run through the model (padding excluded)
    grad_norm: float


def autocast_precision(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast region of a forward: bf16 on GPU for "auto" and for "bfloat16", none for float32 (and CPU auto)."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of one optimizer step on one rank: a pure function, so the dropout masks of a step
    are the same whether the run got there in one go or resumed from any earlier checkpoint."""
    digest = hashlib.sha256(f"sstoken-train:{seed}:{step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_ranks(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over every rank (in place; unchanged when there is one rank)."""
    if _distributed():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def sum_gradients_across_ranks(parameters: Sequence[torch.nn.Parameter]) -> None:
    """Replace each gradient by its sum over ranks, with one all-reduce over a flat buffer."""
    if not _distributed():
        return
    grads = [p.grad for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class BatchLoss(Protocol):
    """What a step trains on: this rank's (kept tokens, tokens, weight total) of its micro-batches before any forward
    (so every rank can divide by the global totals), and one micro-batch's weighted NLL sum, with its graph.

    A loss whose weights come out of its forwards (`weight_in_forward`: online weighted methods) cannot know the
    weight total before them: the step divides the gradients by `take_forward_weight()`, summed over ranks, after."""

    weight_in_forward: bool

    def totals(self, micro_batches: Sequence[Any]) -> tuple[int, int, float]: ...

    def __call__(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...

    def take_forward_weight(self) -> float: ...


class MaskedLoss:
    """The loss on the tokens a micro-batch's labels keep, weighted by its weights (masks selected offline)."""

    weight_in_forward = False  # the masks carry the weights: their total is known before the forwards

    def take_forward_weight(self) -> float:
        raise TypeError("masked training knows its weight total before the forwards")

    def totals(self, micro_batches: Sequence[MicroBatch]) -> tuple[int, int, float]:
        return (sum(kept_count(b.labels) for b in micro_batches), sum(b.tokens for b in micro_batches),
                sum(target_weight(b.labels, b.weights) for b in micro_batches))

    def __call__(self, model: torch.nn.Module, batch: MicroBatch) -> torch.Tensor:
        return masked_nll_sum(model, batch.input_ids, batch.attention_mask, batch.labels, batch.weights)[0]


MASKED = MaskedLoss()


def accumulate_gradients(
    model: torch.nn.Module,
    micro_batches: Sequence[Any],
    global_kept: float,
    precision: contextlib.AbstractContextManager | None = None,
    loss: BatchLoss = MASKED,
) -> float:
    """Forward and backward every micro-batch with loss = weighted NLL sum / `global_kept` (the global batch's
    weight total: its kept-token count when every weight is 1); returns the weighted NLL sum.

    Gradients add up in `.grad` (zero them before a step); the masked-versus-unmasked benchmark times this.
    """
    total = 0.0
    for batch in micro_batches:
        with precision if precision is not None else contextlib.nullcontext():
            nll_sum = loss(model, batch)
        (nll_sum / global_kept).backward()
        total += float(nll_sum.detach())
    return total


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Any],
    lr: float,
    max_grad_norm: float | None,
    precision: contextlib.AbstractContextManager | None = None,
    loss: BatchLoss = MASKED,
) -> StepResult:
    """One optimizer step over this rank's accumulation micro-batches (the other ranks run theirs).

    The kept-token count and weight total of the global batch are summed over ranks first, so every rank divides
    by the same number; gradients are then summed over ranks, clipped, and AdamW steps at `lr`. `loss`: what the
    micro-batches train on (default: the kept tokens of their labels; online selection picks them in the forward).
    """
    parameters = trainable_parameters(model)
    device = parameters[0].device  # NCCL reduces tensors on the GPU only
    local = torch.tensor(loss.totals(micro_batches), dtype=torch.float64, device=device)
    kept, tokens, global_weight = sum_across_ranks(local).tolist()
    global_kept, global_tokens = int(kept), int(tokens)
    if global_kept == 0 or not global_weight > 0:
        raise ValueError("a global batch without kept tokens or with weight total 0: the data plan should have left "
                         "such samples out")
    optimizer.zero_grad(set_to_none=False)
    for parameter in parameters:
        if parameter.grad is None:
            parameter.grad = torch.zeros_like(parameter)
    if loss.weight_in_forward:  # sum(w nll) over the micro-batches, then the gradients divided by the global total
        nll_sum = accumulate_gradients(model, micro_batches, 1.0, precision, loss)
        global_weight = sum_across_ranks(torch.tensor([loss.take_forward_weight()], dtype=torch.float64,
                                                       device=device)).item()
        if global_weight > 0:
            for parameter in parameters:
                parameter.grad.div_(global_weight)
        else:  # every selected token weighs 0 (probabilities that underflow): zero gradients, loss 0
            global_weight = 1.0
    else:
        nll_sum = accumulate_gradients(model, micro_batches, global_weight, precision, loss)
    sum_gradients_across_ranks(parameters)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm is not None else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    loss = sum_across_ranks(torch.tensor([nll_sum], dtype=torch.float64, device=device)).item() / global_weight
    return StepResult(loss=loss, kept_tokens=global_kept, tokens=global_tokens, grad_norm=float(norm))

