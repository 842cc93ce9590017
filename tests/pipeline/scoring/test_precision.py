"""Precision modes: float32; mixed bf16 (bf16 decoder matmuls, float32 elsewhere); full bf16 with float32 softmaxes."""

import numpy as np
import pytest
import torch

import pipeline.scoring.attention as attention
import pipeline.scoring.scorer as scorer_module
from pipeline.scoring.precision import (
    FLOAT32,
    FULL_BFLOAT16,
    MIXED_BFLOAT16,
    apply_precision,
    compute_precision,
    cpu_bfloat16_note,
    full_precision,
    load_dtype,
    precision_name,
    to_mixed_precision,
)
from pipeline.scoring.scorer import Scorer, ScoreSettings
from tests.pipeline.scoring.reference import load_eager

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
    original = attention.batched_context_attention_mass

    def spy(query, key, *args, **kwargs):
        seen["importance"].append((torch.is_autocast_enabled("cpu"), args[-1]))
        return original(query, key, *args, **kwargs)

    monkeypatch.setattr(attention, "batched_context_attention_mass", spy)
    scorer = Scorer(llama_dir, ScoreSettings(dtype="bfloat16", device="cpu"), importance=True)
    head = scorer.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: seen["head"].append((torch.is_autocast_enabled("cpu"), out.dtype)))
    ids = np.arange(3, 40)
    mask = np.arange(37) >= 10
    result = scorer.token_signals(["s"], [ids], [mask])[0]

    assert seen["importance"] == [(False, torch.float32)]  # outside autocast, QK^T in float32
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


# -- the full-bf16 mode (`dtype: bfloat16-full`, and `auto` on CUDA) -----------------------------


def test_auto_resolves_per_device(monkeypatch):
    assert precision_name("auto", "cpu") == FLOAT32
    assert precision_name("auto", torch.device("cuda")) == FULL_BFLOAT16
    assert precision_name("bfloat16", "cuda") == MIXED_BFLOAT16  # an explicit choice means the same everywhere
    assert precision_name("bfloat16-full", "cpu") == FULL_BFLOAT16
    assert precision_name("float32", "cuda") == FLOAT32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert precision_name("auto", "auto") == FULL_BFLOAT16  # the driver resolves `device: auto` as it sees it
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert precision_name("auto", "auto") == FLOAT32
    with pytest.raises(ValueError, match="float16"):
        precision_name("float16")


def test_scorer_resolves_auto_to_float32_on_cpu(llama_dir):
    scorer = Scorer(llama_dir, ScoreSettings(device="cpu"), importance=False)
    assert scorer.dtype_name == FLOAT32
    assert all(p.dtype == torch.float32 for p in scorer.model.parameters())


def test_full_mode_makes_every_parameter_bf16(llama_dir):
    model = load_eager(llama_dir)
    apply_precision(model, FULL_BFLOAT16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert load_dtype(FULL_BFLOAT16) == "auto"


def test_full_mode_runs_head_and_qk_in_bf16_and_softmaxes_in_fp32(llama_dir, monkeypatch):
    seen = {"importance": [], "head": [], "log_softmax_input": []}
    original = attention.batched_context_attention_mass

    def spy(query, key, *args, **kwargs):
        seen["importance"].append((query.dtype, args[-1]))
        return original(query, key, *args, **kwargs)

    real_cross_entropy = torch.nn.functional.cross_entropy

    def cross_entropy_spy(logits, *args, **kwargs):
        seen["log_softmax_input"].append(logits.dtype)
        return real_cross_entropy(logits, *args, **kwargs)

    monkeypatch.setattr(attention, "batched_context_attention_mass", spy)
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy_spy)
    scorer = Scorer(llama_dir, ScoreSettings(dtype="bfloat16-full", device="cpu"), importance=True)
    head = scorer.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, out: seen["head"].append((args[0].dtype, out.dtype)))
    ids = np.arange(3, 40)
    mask = np.arange(37) >= 10
    result = scorer.token_signals(["s"], [ids], [mask])[0]

    assert seen["importance"] == [(torch.bfloat16, torch.bfloat16)]
    assert seen["head"] == [(torch.bfloat16, torch.bfloat16)]
    assert seen["log_softmax_input"] == [torch.float32]
    assert result.nll.dtype == np.float32 and result.attn.dtype == np.float32
    assert not np.isnan(result.nll[mask]).any() and not np.isnan(result.attn[mask]).any()


# Tolerances of the full-bf16 mode against float32 on the tiny random model (hidden 64, 2 layers): bf16
# keeps 8 bits of mantissa (~0.4% per rounding); measured 0.019 nats and 0.0007 of attention mass at
# most, so these leave 2.5x and 7x of margin. Real-model figures: README, Performance
# (tests/benchmarks/bench_gpu.py --device cpu --agreement).
FULL_NLL_ATOL = 0.05
FULL_ATTN_ATOL = 0.005


def test_full_bf16_scores_stay_close_to_float32(llama_dir):
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 300, n) for n in (60, 90, 120)]
    masks = [np.arange(len(x)) >= 20 for x in ids]
    names = ["a", "b", "c"]
    exact = Scorer(llama_dir, ScoreSettings(dtype="float32", device="cpu"), importance=True).token_signals(names, ids, masks)
    full = Scorer(llama_dir, ScoreSettings(dtype="bfloat16-full", device="cpu"), importance=True).token_signals(names, ids, masks)
    nll_diff = max(np.abs(a.nll[m] - b.nll[m]).max() for a, b, m in zip(exact, full, masks))
    attn_diff = max(np.abs(a.attn[m] - b.attn[m]).max() for a, b, m in zip(exact, full, masks))
    assert 0 < nll_diff < FULL_NLL_ATOL  # > 0: the mode really ran in bf16
    assert 0 < attn_diff < FULL_ATTN_ATOL


@pytest.mark.parametrize(
    ("capabilities", "name", "noted"),
    [
        ({"avx2": True}, MIXED_BFLOAT16, True),
        ({"avx2": True}, FULL_BFLOAT16, True),
        ({"avx2": True}, FLOAT32, False),
        ({"avx512_bf16": True}, MIXED_BFLOAT16, False),
        ({"amx_bf16": True}, FULL_BFLOAT16, False),
    ],
)
def test_a_bf16_mode_on_a_cpu_without_native_bf16_is_noted(monkeypatch, capabilities, name, noted):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    note = cpu_bfloat16_note(name)
    assert (note is not None) == noted
    if noted:
        assert name in note and "AVX512_BF16" in note
