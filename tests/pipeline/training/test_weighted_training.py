"""Per-token weights in the trainer's loss, sum(w_i * nll_i) / sum(w_i) over the global batch: all 1 is today's
kept-token mean bit for bit; other weights match a loss computed by hand from full logits."""

from __future__ import annotations

import copy

import numpy as np
import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.training.masked_loss import IGNORE_INDEX
from pipeline.training.train_step import MicroBatch, accumulate_gradients, train_step
from pipeline.training.train_worker import micro_batch
from pipeline.training.training_data import build_index, load_samples, open_training_data
from tests.factories import write_keep_masks, write_tokenized
from tests.pipeline.training.test_train_step import MICRO


def _weighted(batch: MicroBatch, weights: torch.Tensor | None) -> MicroBatch:
    return MicroBatch(batch.input_ids, batch.attention_mask, batch.labels, weights)


def _ones(batch: MicroBatch) -> torch.Tensor:
    return (batch.labels != IGNORE_INDEX).to(torch.float32)


def _random_weights(batch: MicroBatch, generator: torch.Generator) -> torch.Tensor:
    """A weight in [0.25, 2) at every label, 0 elsewhere."""
    return torch.where(batch.labels != IGNORE_INDEX, 0.25 + 1.75 * torch.rand(batch.labels.shape, generator=generator),
                       torch.zeros(batch.labels.shape))


def _train(model: torch.nn.Module, steps: list[list[MicroBatch]]) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step, batches in enumerate(steps):
        torch.manual_seed(step)
        losses.append(train_step(model, optimizer, batches, lr=1e-3, max_grad_norm=1.0).loss)
    return losses


def test_weights_all_1_train_the_same_tensors_as_the_unweighted_path_bit_for_bit(llama_dir):
    base = load_model(llama_dir).train()
    unweighted, weighted = copy.deepcopy(base), copy.deepcopy(base)
    steps = [MICRO[:2], MICRO[2:], MICRO, MICRO[1:3]]
    losses = _train(unweighted, [[_weighted(b, None) for b in batches] for batches in steps])
    weighted_losses = _train(weighted, [[_weighted(b, _ones(b)) for b in batches] for batches in steps])
    assert weighted_losses == losses
    for (name, a), b in zip(unweighted.state_dict().items(), weighted.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(next(iter(base.state_dict().values())), next(iter(unweighted.state_dict().values())))


def _hand_loss(model: torch.nn.Module, batches: list[MicroBatch]) -> torch.Tensor:
    """sum(w_i * nll_i) / sum(w_i) over every micro-batch, from full float32 logits: position t - 1 predicts token t."""
    numerator, denominator = torch.zeros((), dtype=torch.float64), 0.0
    for batch in batches:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        for row in range(batch.labels.shape[0]):
            for t in range(1, batch.labels.shape[1]):
                if batch.labels[row, t] != IGNORE_INDEX:
                    nll = -log_probs[row, t - 1, batch.labels[row, t]]
                    numerator = numerator + batch.weights[row, t].double() * nll.double()
                    denominator += float(batch.weights[row, t])
    return numerator / denominator


def test_a_weighted_step_is_the_weighted_mean_nll_computed_by_hand(llama_dir):
    model = load_model(llama_dir).train()
    model.config.use_cache = False
    generator = torch.Generator().manual_seed(4)
    batches = [_weighted(b, _random_weights(b, generator)) for b in MICRO]
    assert len({round(float(w), 6) for b in batches for w in b.weights[b.labels != IGNORE_INDEX]}) > 5  # not all equal

    torch.manual_seed(0)
    hand = _hand_loss(model, batches)
    hand.backward()
    expected = hand.detach()
    hand_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total_weight = float(sum(b.weights.sum() for b in batches))
    weighted_sum = accumulate_gradients(model, batches, total_weight)
    assert abs(weighted_sum / total_weight - float(expected)) < 1e-5 * float(expected)
    for a, b in zip(hand_grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, a.to(b.dtype), rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        unweighted = _hand_loss(model, [_weighted(b, _ones(b)) for b in batches])
    assert abs(float(unweighted) - float(expected)) > 1e-3  # the weights change the loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    assert abs(train_step(model, optimizer, batches, lr=1e-3, max_grad_norm=None).loss - float(expected)) < 1e-5 * float(expected)


def test_the_trainer_reads_the_masks_weights_and_old_masks_as_weight_1(tokenizer, tmp_path):
    tokenized = write_tokenized(tmp_path / "tokenized", tokenizer, [3, 2], seed=2)
    for weights in ("random", None):
        masks = write_keep_masks(tmp_path / f"masks-{weights}", tokenized, ratio=0.6, seed=3, kind="masks", weights=weights)
        source = open_training_data(tokenized, masks)
        index = build_index(source)
        rows = load_samples(source, index, np.arange(index.samples))
        batch = micro_batch(rows, np.arange(index.samples))
        kept = batch.labels != IGNORE_INDEX
        assert torch.equal(batch.weights == 0, ~kept)  # 0 off the kept tokens and on padding, > 0 on them
        if weights is None:
            assert torch.equal(batch.weights, kept.to(torch.float32))
        else:
            stored = torch.cat([torch.from_numpy(rows[p][2]) for p in range(index.samples)])
            assert torch.equal(batch.weights[batch.attention_mask.bool()], stored)
            assert len(set(stored[stored > 0].tolist())) > 3
