import numpy as np
import pytest
import torch

from pipeline.runtime.checkpoints import load_model
from pipeline.scoring.attention import (
    REQUEST_KWARG,
    ImportanceRequest,
    batched_context_attention_mass,
    context_attention_mass,
    register_importance_attention,
    turn_starts,
)


def test_turn_starts_literal():
    trainable = np.array([0, 0, 1, 1, 0, 0, 1, 1, 1, 0, 1], dtype=bool)
    assert turn_starts(trainable).tolist() == [-1, -1, 2, 2, -1, -1, 6, 6, 6, -1, 10]
    assert turn_starts(np.zeros(3, bool)).tolist() == [-1, -1, -1]


def _explicit_mass(query, key, scaling, positions, ends):
    heads, kv_heads = query.shape[0], key.shape[0]
    expanded = key.repeat_interleave(heads // kv_heads, dim=0)
    out = []
    for i, end in zip(positions.tolist(), ends.tolist()):
        scores = torch.einsum("hd,hjd->hj", query[:, i], expanded[:, : i + 1]) * scaling
        probabilities = torch.softmax(scores, -1)
        out.append(probabilities[:, :end].sum(-1).mean())
    return torch.stack(out)


@pytest.mark.parametrize("block_elements", [1, 50, 1 << 24])
def test_mass_matches_explicit_softmax_with_gqa(block_elements):
    torch.manual_seed(0)
    query, key = torch.randn(6, 12, 8) * 2, torch.randn(2, 12, 8) * 2
    positions = torch.tensor([3, 4, 5, 9, 10])
    ends = torch.tensor([3, 3, 3, 9, 9])
    got = context_attention_mass(query, key, 0.35, positions, ends, block_elements)
    torch.testing.assert_close(got, _explicit_mass(query, key, 0.35, positions, ends), atol=1e-6, rtol=0)


def test_mass_of_no_queries_is_empty():
    out = context_attention_mass(torch.randn(2, 4, 8), torch.randn(2, 4, 8), 1.0, torch.tensor([], dtype=torch.long),
                                 torch.tensor([], dtype=torch.long))
    assert out.shape == (0,)


@pytest.mark.parametrize("family_dir", ["llama_dir", "qwen2_dir"])
@pytest.mark.parametrize("padded", [True, False])
@torch.no_grad()
def test_wrapped_attention_leaves_model_outputs_unchanged(request, family_dir, padded):
    """Same hidden states as plain SDPA, with and without padding (the None-mask case)."""
    folder = request.getfixturevalue(family_dir)
    plain = load_model(folder)
    wrapped = load_model(folder)
    wrapped.set_attn_implementation(register_importance_attention())
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[1, 6:] = 0
    trainable = [np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 1], bool), np.array([0, 0, 1, 1, 0, 1, 0, 0, 0, 0], bool)]
    req = ImportanceRequest.for_batch(plain.config.num_hidden_layers - 1, trainable, torch.device("cpu"))
    arg = mask if padded else None
    expected = plain.model(input_ids=ids, attention_mask=arg).last_hidden_state
    got = wrapped.model(input_ids=ids, attention_mask=arg, **{REQUEST_KWARG: req}).last_hidden_state
    valid = mask.bool()
    torch.testing.assert_close(got[valid], expected[valid], atol=1e-5, rtol=0)
    per_sample = req.per_sample([5, 3])
    assert req.result.shape == (2, 5) and [len(r) for r in per_sample] == [5, 3]
    assert all(((r > 0) & (r < 1)).all() for r in per_sample)
    assert (req.result[1, 3:] == 0).all()  # padding entries: no context, no NaN


@pytest.mark.parametrize("block_elements", [1, 300, 1 << 24])
def test_batched_mass_equals_the_per_sample_mass_exactly(block_elements):
    """One batched recompute over padded query slots gives each sample's per-sample result, and 0 in the
    padding slots, to float32 rounding: the same products and masks, but a shorter sample's softmax sums
    over more (zero) entries and the blocks hold other matmul shapes, which can reorder float32
    additions by an ulp or two (measured: at most 1.2e-7)."""
    torch.manual_seed(1)
    query, key = torch.randn(3, 6, 16, 8) * 2, torch.randn(3, 2, 16, 8) * 2
    masks = [np.zeros(16, bool) for _ in range(3)]
    masks[0][[3, 4, 5, 9, 10, 11, 15]] = True
    masks[1][[2, 3]] = True
    masks[2][[7, 8, 9, 12]] = True
    request = ImportanceRequest.for_batch(0, masks, torch.device("cpu"))
    batched = batched_context_attention_mass(
        query, key, 0.35, request.positions, request.context_end, request.key_length, block_elements
    )
    for b, mask in enumerate(masks):
        n = int(mask.sum())
        alone = context_attention_mass(query[b], key[b], 0.35, request.positions[b, :n], request.context_end[b, :n], block_elements)
        torch.testing.assert_close(batched[b, :n], alone, rtol=1e-6, atol=0)
        assert (batched[b, n:] == 0).all()
