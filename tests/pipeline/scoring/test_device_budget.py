"""Micro-batch budgets per device: on CPU the setting, or auto from the model's widths; on CUDA, from free device memory."""

import pytest
import torch
from transformers import LlamaConfig

from pipeline.scoring.device_budget import (
    CPU_CHUNK_ELEMENTS,
    CPU_LOGIT_CHUNK_ELEMENTS,
    GPU_MAX_BATCH_TOKENS,
    GPU_MAX_CHUNK_ELEMENTS,
    activation_bytes_per_token,
    cpu_batch_tokens,
    device_budget,
)
from pipeline.scoring.scorer import Scorer, ScoreSettings

CUDA = torch.device("cuda")
GIB = 1 << 30
# Llama-3.2-1B's widths: 2 bytes x (6 x 2048 + 3 x 8192) = 73,728 bytes of activations per token.
ONE_B = LlamaConfig(hidden_size=2048, intermediate_size=8192)


def test_cpu_budget_is_the_setting_when_it_is_a_number():
    got = device_budget(torch.device("cpu"), ONE_B, 16384, "auto", 4)
    assert (got.batch_tokens, got.logit_chunk_elements, got.score_block_elements) == (
        16384, CPU_LOGIT_CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
    assert CPU_CHUNK_ELEMENTS * 4 == 8 << 20  # an 8 MiB float32 importance block, well under glibc's mmap threshold
    # a float32 logit chunk of 30 MiB: 160 rows of |V| = 49,152 per read of the head's weight, under the 32 MiB ceiling
    assert CPU_LOGIT_CHUNK_ELEMENTS * 4 == 30 << 20 and CPU_LOGIT_CHUNK_ELEMENTS // 49152 == 160


def test_cpu_budget_auto_keeps_the_largest_activation_within_8_mib():
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536)
    assert cpu_batch_tokens(smollm2, 4) == 1365  # 8 MiB / (4 bytes x 1536)
    assert cpu_batch_tokens(ONE_B, 2) == 512  # 8 MiB / (2 bytes x 8192)
    wide_hidden = type("Config", (), {"hidden_size": 4096, "intermediate_size": 1024})()
    assert cpu_batch_tokens(wide_hidden, 4) == 512  # the wider of the two widths counts
    huge = LlamaConfig(hidden_size=8192, intermediate_size=1 << 22)
    assert cpu_batch_tokens(huge, 4) == 1  # never zero: a sample longer than the budget gets its own batch
    assert device_budget(torch.device("cpu"), smollm2, "auto", "auto", 4).batch_tokens == 1365


def test_activation_bytes_literal():
    assert activation_bytes_per_token(ONE_B, 2) == 73728
    no_width = type("Config", (), {"hidden_size": 8})()  # a config without intermediate_size: 4 x hidden
    assert activation_bytes_per_token(no_width, 4) == 4 * (6 * 8 + 3 * 32)


@pytest.fixture
def free_memory(monkeypatch):
    """A fake CUDA device with `state["free"]` bytes free and `state["cached"]` held unused by the allocator."""
    state = {"free": 0, "cached": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"], 141 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: state["cached"] + 5 * GIB)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 5 * GIB)
    return state


def test_cuda_budget_follows_free_memory(free_memory):
    free_memory["free"] = 2 * GIB
    small = device_budget(CUDA, ONE_B, 16384, "auto", 2)
    assert small.batch_tokens == (1 * GIB) // 73728  # half the free memory, 73,728 bytes a token
    free_memory["cached"] = 2 * GIB  # memory the caching allocator holds unused counts as free
    assert device_budget(CUDA, ONE_B, 16384, "auto", 2).batch_tokens == (2 * GIB) // 73728
    free_memory.update(free=120 * GIB, cached=0)
    large = device_budget(CUDA, ONE_B, 16384, "auto", 2)
    assert large.batch_tokens == GPU_MAX_BATCH_TOKENS  # the ceiling, not 870k tokens
    assert large.logit_chunk_elements == GPU_MAX_CHUNK_ELEMENTS > small.logit_chunk_elements >= CPU_CHUNK_ELEMENTS


def test_cuda_budget_never_drops_below_one_token_and_a_number_wins(free_memory):
    free_memory["free"] = 1000
    assert device_budget(CUDA, ONE_B, 16384, "auto", 2).batch_tokens == 1
    assert device_budget(CUDA, ONE_B, 16384, 4096, 2).batch_tokens == 4096
    assert device_budget(CUDA, ONE_B, 16384, "auto", 2, free_bytes=4 * GIB).batch_tokens == (2 * GIB) // 73728


def test_gpu_batch_tokens_setting_is_validated_and_left_out_of_the_run_key():
    from pipeline.scoring.score_config import ScoreJobConfig

    assert ScoreSettings().gpu_batch_tokens == "auto" and ScoreSettings(gpu_batch_tokens="2048").gpu_batch_tokens == 2048
    with pytest.raises(ValueError, match="gpu_batch_tokens"):
        ScoreSettings(gpu_batch_tokens=0)
    with pytest.raises(ValueError, match="gpu_batch_tokens"):
        ScoreSettings(gpu_batch_tokens="lots")
    assert "gpu_batch_tokens" not in ScoreJobConfig.run_key_fields()
    assert "max_batch_tokens" in ScoreJobConfig.run_key_fields()


def test_scorer_batches_by_its_budget(llama_dir):
    import numpy as np

    scorer = Scorer(llama_dir, ScoreSettings(device="cpu", max_batch_tokens=100), importance=False)
    assert scorer.budget.batch_tokens == 100
    ids = [np.arange(1, 41)] * 5
    masks = [np.arange(40) >= 5] * 5
    scorer.token_signals(list("abcde"), ids, masks)
    assert scorer.forward_count == 3  # 2 + 2 + 1 samples of 40 tokens under a 100-token budget


def test_max_batch_tokens_defaults_to_auto_and_takes_a_number():
    assert ScoreSettings().max_batch_tokens == "auto" and ScoreSettings(max_batch_tokens="2048").max_batch_tokens == 2048
    for bad in (0, "lots"):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            ScoreSettings(max_batch_tokens=bad)
