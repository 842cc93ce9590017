"""The masked SFT loss on literal tensors: labels, a hand-computed NLL, zero gradient off the kept tokens."""

from __future__ import annotations

import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.training.masked_loss import IGNORE_INDEX, decoder_of, kept_count, masked_labels, masked_nll_sum

IDS = torch.tensor([[5, 7, 9, 11, 13], [21, 23, 25, 0, 0]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
KEEP = torch.tensor([[True, True, False, True, False], [False, False, True, False, False]])


def test_labels_copy_kept_ids_and_ignore_the_rest_and_position_zero():
    labels = masked_labels(IDS, KEEP)
    assert labels.tolist() == [[-100, 7, -100, 11, -100], [-100, -100, 25, -100, -100]]
    assert kept_count(labels) == 3
    assert IGNORE_INDEX == -100


def test_nll_sum_equals_a_hand_computation_and_transformers_loss(llama_dir):
    model = load_model(llama_dir)
    labels = masked_labels(IDS, KEEP)
    nll_sum, count = masked_nll_sum(model, IDS, MASK, labels)
    logits = model(input_ids=IDS, attention_mask=MASK).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    # Token i is predicted at position i-1: kept targets (0, 1), (0, 3), (1, 2).
    by_hand = -(logp[0, 0, 7] + logp[0, 2, 11] + logp[1, 1, 25])
    assert count == 3
    torch.testing.assert_close(nll_sum, by_hand, rtol=1e-5, atol=1e-5)
    # transformers 5: with num_items_in_batch the loss is the NLL sum over that count.
    hf = model(input_ids=IDS, attention_mask=MASK, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    torch.testing.assert_close(hf, by_hand / 7, rtol=1e-5, atol=1e-5)


def test_a_token_not_kept_gets_exactly_zero_gradient(llama_dir):
    """The hidden state that predicts token i feeds only the head; its gradient is zero unless i is kept."""
    model = load_model(llama_dir).train()
    captured = {}

    def keep_output(module, args, output):
        output.last_hidden_state.retain_grad()
        captured["hidden"] = output.last_hidden_state

    decoder_of(model).register_forward_hook(keep_output)
    labels = masked_labels(IDS, KEEP)
    nll_sum, _ = masked_nll_sum(model, IDS, MASK, labels)
    nll_sum.backward()
    grad = captured["hidden"].grad.abs().sum(dim=-1)
    predicts_kept = torch.zeros_like(KEEP)
    predicts_kept[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert bool((grad[~predicts_kept] == 0).all())  # exactly zero, not small
    assert bool((grad[predicts_kept] > 0).all())
