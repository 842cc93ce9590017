"""One optimizer step: global-batch normalisation, one rank vs two ranks, the schedule, seeds, precision."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.training import train_step as step_module
from pipeline.training.masked_loss import masked_labels
from pipeline.training.train_settings import TrainSettings, accumulation_steps, learning_rate, warmup_steps
from pipeline.training.train_step import (
    MicroBatch,
    accumulate_gradients,
    autocast_precision,
    step_seed,
    train_step,
)


def _micro(ids: list[list[int]], keep: list[list[bool]]) -> MicroBatch:
    width = max(len(row) for row in ids)
    input_ids = torch.tensor([row + [0] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    keep_t = torch.tensor([row + [False] * (width - len(row)) for row in keep])
    return MicroBatch(input_ids, mask, masked_labels(input_ids, keep_t))


# Four micro-batches of unequal kept counts (3, 1, 1, 4; ranks 0 and 1 of two get 4 and 5): a mean per
# micro-batch or per rank would weigh them differently.
MICRO = [
    _micro([[5, 7, 9, 11], [13, 15, 17]], [[False, True, True, False], [False, False, True]]),
    _micro([[21, 23, 25, 27, 29], [31, 33]], [[False, False, False, False, True], [False, False]]),
    _micro([[41, 43, 45], [47, 49, 51]], [[False, True, False], [False, False, False]]),
    _micro([[61, 63, 65, 67], [69, 71, 73]], [[False, True, True, True], [False, True, False]]),
]


def _grads(model) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def test_accumulated_gradient_is_that_of_the_mean_over_the_global_batch_kept_tokens(llama_dir):
    model = load_model(llama_dir).train()
    accumulate_gradients(model, MICRO[:2], global_kept=4)
    accumulated = _grads(model)
    model.zero_grad()
    # The same 4 samples as one micro-batch: NLL sum / 4, one backward.
    together = _micro(
        [[5, 7, 9, 11], [13, 15, 17], [21, 23, 25, 27, 29], [31, 33]],
        [[False, True, True, False], [False, False, True], [False, False, False, False, True], [False, False]],
    )
    accumulate_gradients(model, [together], global_kept=4)
    for a, b in zip(accumulated, _grads(model)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


class _TwoRankCollective:
    """all_reduce(SUM) between two threads, standing in for a gloo group of two ranks."""

    def __init__(self):
        self.barrier = threading.Barrier(2)
        self.slots: list[torch.Tensor | None] = [None, None]
        self.rank = threading.local()

    def all_reduce(self, tensor: torch.Tensor, op=None) -> None:
        self.slots[self.rank.value] = tensor.clone()
        self.barrier.wait()
        total = self.slots[0] + self.slots[1]
        self.barrier.wait()
        tensor.copy_(total)


def test_two_ranks_give_the_update_of_one_rank_with_the_same_global_batch(llama_dir, monkeypatch):
    base = load_model(llama_dir).train()
    single = copy.deepcopy(base)
    expected = train_step(single, torch.optim.AdamW(single.parameters(), lr=1e-3), MICRO, lr=1e-3, max_grad_norm=None)

    collective = _TwoRankCollective()
    monkeypatch.setattr(step_module, "_distributed", lambda: True)
    monkeypatch.setattr(step_module.dist, "all_reduce", collective.all_reduce)
    ranks = [copy.deepcopy(base), copy.deepcopy(base)]
    results = [None, None]

    def run(rank: int) -> None:
        collective.rank.value = rank
        model = ranks[rank]
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        results[rank] = train_step(model, optimizer, MICRO[rank::2], lr=1e-3, max_grad_norm=None)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0].kept_tokens == results[1].kept_tokens == expected.kept_tokens == 9
    assert results[0].loss == results[1].loss == pytest.approx(expected.loss, rel=1e-6)
    for one, r0, r1 in zip(single.parameters(), *(m.parameters() for m in ranks)):
        torch.testing.assert_close(r0, r1, rtol=0, atol=0)  # the ranks stay identical
        torch.testing.assert_close(r0.grad, one.grad, rtol=1e-4, atol=1e-7)  # summed, not averaged over ranks
        torch.testing.assert_close(r0, one, rtol=1e-5, atol=1e-6)


def test_learning_rate_matches_transformers_linear_schedule_with_warmup():
    from transformers import get_linear_schedule_with_warmup

    total, warmup = 37, warmup_steps(37, 0.1)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-4)
    schedule = get_linear_schedule_with_warmup(optimizer, warmup, total)
    for step in range(total):
        assert learning_rate(step, 2e-4, total, warmup) == pytest.approx(schedule.get_last_lr()[0], abs=1e-15)
        optimizer.step()
        schedule.step()
    assert warmup == 4


def test_accumulation_must_divide_the_global_batch():
    assert accumulation_steps(16, 4, 2) == 2
    with pytest.raises(ValueError, match="batch_size 12 is not a multiple of micro_batch_size 4 x workers 2 = 8"):
        accumulation_steps(12, 4, 2)
    with pytest.raises(ValueError, match="micro_batch_size 8 exceeds batch_size 4"):
        TrainSettings(batch_size=4, micro_batch_size=8)


def test_step_seeds_are_a_pure_function_of_seed_step_and_rank():
    assert step_seed(0, 5) == step_seed(0, 5)
    assert len({step_seed(0, 5), step_seed(0, 6), step_seed(1, 5), step_seed(0, 5, rank=1)}) == 4


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_is_float32_on_cpu_by_default_and_bf16_autocast_when_asked():
    assert not isinstance(autocast_precision("auto", torch.device("cpu")), torch.autocast)
    assert isinstance(autocast_precision("auto", torch.device("cuda")), torch.autocast)
    with autocast_precision("bfloat16", torch.device("cpu")):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
