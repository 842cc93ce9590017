"""Mixed bfloat16: bf16 matmuls in the decoder, float32 everywhere the scores are sensitive."""

import numpy as np
import torch

import pipeline.engine.attention as attention
import pipeline.engine.scorer as scorer_module
from pipeline.engine.precision import (
    MIXED_BFLOAT16,
    compute_precision,
    full_precision,
    load_dtype,
    precision_name,
    to_mixed_precision,
)
from pipeline.engine.scorer import Scorer, ScoreSettings
from tests.pipeline.engine.reference import load_eager

CPU = torch.device("cpu")


def test_precision_names():
    assert precision_name("auto") == "float32"
    assert precision_name("float32") == "float32"
    assert precision_name("bfloat16") == MIXED_BFLOAT16


def _assert_mixed(model):
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert linears and all(m.weight.dtype == torch.bfloat16 for m in linears)
    assert head.weight.dtype == torch.float32
    assert model.get_input_embeddings().weight.dtype == torch.float32
    norms = [p for name, p in model.named_parameters() if "norm" in name]
    assert norms and all(p.dtype == torch.float32 for p in norms)


def test_only_decoder_linears_become_bf16(llama_dir):
    model = load_eager(llama_dir)
    to_mixed_precision(model)
    _assert_mixed(model)


def test_mixed_mode_loads_a_checkpoint_in_its_own_dtype(llama_dir, tmp_path, monkeypatch):
    """A bf16 checkpoint is read as bf16 (never a full float32 copy) and its head, embeddings and
    norms upcast exactly; a float32 checkpoint keeps its float32 head values untouched."""
    assert load_dtype("float32") == torch.float32 and load_dtype(MIXED_BFLOAT16) == "auto"
    stored = load_eager(llama_dir).to(torch.bfloat16)
    stored.save_pretrained(tmp_path, safe_serialization=True)
    requested = []
    real_load = scorer_module.load_model

    def recording_load(path, dtype, *args, **kwargs):
        requested.append(dtype)
        return real_load(path, dtype, *args, **kwargs)

    monkeypatch.setattr(scorer_module, "load_model", recording_load)
    scorer = Scorer(tmp_path, ScoreSettings(dtype="bfloat16", device="cpu"), importance=True)
    _assert_mixed(scorer.model)
    assert requested == ["auto"]
    embeddings = scorer.model.get_input_embeddings().weight
    assert torch.equal(embeddings, stored.get_input_embeddings().weight.float())

    original = load_eager(llama_dir).get_output_embeddings().weight
    mixed = Scorer(llama_dir, ScoreSettings(dtype="bfloat16", device="cpu"), importance=True).model
    assert torch.equal(mixed.get_output_embeddings().weight, original)


def test_contexts_switch_matmul_precision():
    a = torch.randn(4, 4)
    with compute_precision(MIXED_BFLOAT16, CPU):
        assert (a @ a).dtype == torch.bfloat16
        with full_precision(CPU):
            assert (a @ a).dtype == torch.float32
    with compute_precision("float32", CPU):
        assert (a @ a).dtype == torch.float32


def test_mixed_scorer_keeps_head_and_importance_in_float32(llama_dir, llama_history_dir, monkeypatch):
    """The LM head and the importance recompute must run outside autocast, on float32 inputs."""
    seen = {"importance": [], "head": []}
    original = attention.context_attention_mass

    def spy(query, key, *args, **kwargs):
        seen["importance"].append((torch.is_autocast_enabled("cpu"), query.dtype))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "context_attention_mass", spy)
    scorer = Scorer(llama_dir, ScoreSettings(dtype="bfloat16", device="cpu"), importance=True)
    head = scorer.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: seen["head"].append((torch.is_autocast_enabled("cpu"), out.dtype)))
    ids = np.arange(3, 40)
    mask = np.arange(37) >= 10
    result = scorer.token_signals(["s"], [ids], [mask])[0]

    assert seen["importance"] and all(not autocast for autocast, _ in seen["importance"])
    assert seen["head"] == [(False, torch.float32)]
    assert result.nll.dtype == np.float32 and not np.isnan(result.nll[mask]).any()


def test_mixed_scores_stay_close_to_float32(llama_dir, llama_history_dir):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, n) for n in (60, 90, 120)]
    masks = [np.arange(len(x)) >= 20 for x in ids]
    names = ["a", "b", "c"]
    exact = Scorer(llama_dir, ScoreSettings(dtype="float32", device="cpu"), importance=True).token_signals(names, ids, masks)
    mixed = Scorer(llama_dir, ScoreSettings(dtype="bfloat16", device="cpu"), importance=True).token_signals(names, ids, masks)
    for a, b, m in zip(exact, mixed, masks):
        assert np.abs(a.nll[m] - b.nll[m]).max() < 0.05
        assert np.abs(a.attn[m] - b.attn[m]).max() < 0.02
