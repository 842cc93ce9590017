import pytest
import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.scoring.nll import output_head, target_nll


@pytest.fixture(scope="module")
def model(llama_dir):
    return load_model(llama_dir)


def _full_logits_nll(model, ids):
    logits = model(input_ids=ids).logits.float()
    return -torch.log_softmax(logits, -1)


@torch.no_grad()
def test_target_nll_matches_full_logits_at_targets_only(model):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 9))
    targets = torch.zeros(2, 9, dtype=torch.bool)
    targets[0, [3, 4, 8]] = True
    targets[1, [1, 5]] = True
    hidden = model.model(input_ids=ids).last_hidden_state
    head, softcap = output_head(model)
    nll = target_nll(hidden, ids, targets, head, softcap)
    log_probs = _full_logits_nll(model, ids)
    # Target i is predicted at i-1: nll[(b, i)] = -log softmax(logits[b, i-1])[x_i].
    expected = [log_probs[b, i - 1, ids[b, i]] for b, i in [(0, 3), (0, 4), (0, 8), (1, 1), (1, 5)]]
    torch.testing.assert_close(nll, torch.stack(expected), atol=1e-5, rtol=0)


@torch.no_grad()
def test_chunking_does_not_change_results(model):
    torch.manual_seed(1)
    ids = torch.randint(0, 300, (3, 20))
    targets = torch.rand(3, 20) > 0.3
    targets[:, 0] = False
    hidden = model.model(input_ids=ids).last_hidden_state
    head, _ = output_head(model)
    whole = target_nll(hidden, ids, targets, head)
    one_row_chunks = target_nll(hidden, ids, targets, head, chunk_elements=1)
    torch.testing.assert_close(whole, one_row_chunks, atol=1e-6, rtol=0)
    assert whole.shape == (int(targets.sum()),)


def test_position_zero_is_never_a_target(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    targets = torch.tensor([[True, False, True, False]])
    head, _ = output_head(model)
    with pytest.raises(ValueError, match="position 0"):
        target_nll(torch.zeros(1, 4, model.config.hidden_size), ids, targets, head)
