"""The current model's predictive entropy, taken from the NLL's own logit chunks: against a plain forward."""

import numpy as np
import pytest
import torch

from pipeline.scoring.nll import gathered_nll, gathered_nll_entropy, output_head
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.scoring.scorer import Scorer
from tests.pipeline.scoring.reference import load_eager

FP32 = dict(dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def samples():
    """Lengths that force padding and several micro-batches; targets in two runs, never position 0."""
    rng = np.random.default_rng(5)
    ids = [rng.integers(0, 300, n) for n in (31, 9, 50, 17)]
    masks = []
    for x in ids:
        mask = np.zeros(len(x), bool)
        mask[len(x) // 3 : len(x) - 1] = True
        mask[1] = True
        masks.append(mask)
    return [f"s{i}" for i in range(len(ids))], ids, masks


def _hand_entropy(model, ids: np.ndarray) -> np.ndarray:
    """entropy[i] of the distribution predicting token i (row i - 1 of a plain forward); NaN at 0."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids, dtype=torch.long)[None]).logits[0].float()
    log_probs = torch.log_softmax(logits, dim=-1)
    rows = -(torch.softmax(logits, dim=-1) * log_probs).sum(-1).numpy()
    return np.concatenate([[np.nan], rows[:-1]])


def test_entropy_matches_a_plain_forward_at_targets_only(llama_dir, samples):
    sample_ids, ids, masks = samples
    scorer = Scorer(llama_dir, ScoreSettings(max_batch_tokens=60, **FP32), importance=False, entropy=True)
    results = scorer.token_signals(sample_ids, ids, masks)
    assert scorer.forward_count > 1  # several padded micro-batches
    model = load_eager(llama_dir)
    for result, x, mask in zip(results, ids, masks):
        assert result.entropy.dtype == np.float32
        assert np.isnan(result.entropy).tolist() == (~mask).tolist()  # NaN exactly off the targets
        np.testing.assert_allclose(result.entropy[mask], _hand_entropy(model, x)[mask], rtol=1e-5, atol=1e-5)
        assert (result.entropy[mask] > 0).all() and (result.entropy[mask] <= np.log(model.config.vocab_size) + 1e-4).all()


def test_entropy_leaves_the_nll_bits_alone_and_is_off_by_default(llama_dir, samples):
    """Both precision modes: the NLLs with the entropy asked are the very bits of the cross-entropy path."""
    sample_ids, ids, masks = samples
    for dtype in ("float32", "bfloat16-full"):
        settings = ScoreSettings(dtype=dtype, device="cpu")
        plain = Scorer(llama_dir, settings, importance=False).token_signals(sample_ids, ids, masks)
        both = Scorer(llama_dir, settings, importance=True, entropy=True).token_signals(sample_ids, ids, masks)
        for p, b in zip(plain, both):
            assert p.entropy is None and b.entropy is not None
            np.testing.assert_array_equal(p.nll, b.nll)


def test_entropy_does_not_depend_on_the_chunk_size(llama_dir):
    model = load_eager(llama_dir)
    head, softcap = output_head(model)
    torch.manual_seed(0)
    hidden = torch.randn(2, 6, model.config.hidden_size)
    predicting, labels = torch.tensor([0, 3, 4, 7, 10]), torch.tensor([5, 9, 2, 100, 7])
    with torch.no_grad():
        nll, entropy = gathered_nll_entropy(hidden, predicting, labels, head, softcap, entropy=True)
        one_row_nll, one_row = gathered_nll_entropy(hidden, predicting, labels, head, softcap, chunk_elements=1, entropy=True)
        assert gathered_nll_entropy(hidden, predicting, labels, head, softcap, entropy=False)[1] is None
        torch.testing.assert_close(nll, gathered_nll(hidden, predicting, labels, head, softcap), rtol=0, atol=0)
    torch.testing.assert_close(one_row, entropy)
    torch.testing.assert_close(one_row_nll, nll)
