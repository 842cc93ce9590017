"""How much one micro-batch may hold on its device: the token budget and the sizes of transient chunks.

On CPU they follow from the model's widths: a micro-batch holds as many tokens as keep one layer's
largest activation (the MLP's intermediate, tokens x width) within 8 MiB, and importance blocks hold
8 MiB too. Bigger CPU batches buy nothing (a 2-core GEMM is already efficient at a few hundred rows)
and cost a lot: every tensor over glibc's mmap threshold (32 MiB at most) is a fresh mmap, faulted in
page by page, zeroed and unmapped again, for every op of every layer, and it leaves the caches. With
16,384-token micro-batches SmolLM2-135M ran at 0.55x the speed of 1,365-token ones, a fifth of its
time in the kernel (README, Performance). The LM head's logit chunks are the exception: they take 30 MiB,
the most that stays under that ceiling, because the head's whole weight (|V| x width) is read once per
chunk; at |V| = 49,152 the head with its cross-entropy ran at 54 GFLOP/s in chunks of 42 rows (8 MiB),
92 in chunks of 160 (30 MiB) and 80 in chunks of 341 (64 MiB, over the ceiling), on 2 cores
(`tests/benchmarks/bench_scorer.py --head-chunks`).

On CUDA they follow from the memory left free once the model is loaded (`torch.cuda.mem_get_info`): a
135M model fills the device with long micro-batches that keep it busy, an 8B model gets a budget it
cannot run out of memory with, and the LM head and importance recompute work in chunks large enough for
tensor cores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# On CPU: bytes of a micro-batch's largest activation, and elements of one importance block (8 MiB as
# float32); both stay well under the allocator's mmap threshold. An LM-head chunk's float32 logits (and the
# log-softmax of the same size) take 30 MiB each: the most rows per read of the head's weight that stay under
# glibc's 32 MiB ceiling on its mmap threshold.
CPU_ACTIVATION_BYTES = 8 << 20
CPU_CHUNK_ELEMENTS = 1 << 21
CPU_LOGIT_CHUNK_ELEMENTS = (30 << 20) // 4
# Ceilings on CUDA: past these a micro-batch or chunk is no faster, only larger.
GPU_MAX_BATCH_TOKENS = 1 << 16
GPU_MAX_CHUNK_ELEMENTS = 1 << 28
# Shares of the free memory: a micro-batch's activations, and each transient chunk (logits; scores).
ACTIVATION_SHARE = 0.5
CHUNK_SHARE = 1 / 16
# Bytes a chunk element costs at its peak: bf16 logits or scores, their float32 copy, the softmax output.
CHUNK_ELEMENT_BYTES = 2 + 4 + 4


@dataclass(frozen=True)
class DeviceBudget:
    """Sizes a Scorer works with on its device."""

    batch_tokens: int  # padded tokens of one micro-batch (samples x longest)
    logit_chunk_elements: int  # rows x vocabulary of one LM-head chunk
    score_block_elements: int  # samples x heads x queries x keys of one importance block


def free_device_bytes(device: torch.device) -> int:
    """Bytes free on a CUDA device now (what the caching allocator holds but does not use counts as free)."""
    free, _total = torch.cuda.mem_get_info(device)
    return int(free) + int(torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def activation_bytes_per_token(config: Any, element_bytes: int) -> int:
    """Peak bytes a token's activations take while one decoder layer runs (inference, nothing kept for a
    backward): the residual stream and its normed copy, q/k/v and the attention output, and the MLP's
    gate, up and product, with slack for the kernels' workspaces."""
    hidden = int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or 4 * hidden)
    return element_bytes * (6 * hidden + 3 * intermediate)


def cpu_batch_tokens(config: Any, element_bytes: int) -> int:
    """Tokens of a CPU micro-batch whose largest activation (tokens x the widest layer output) fits
    `CPU_ACTIVATION_BYTES`: 1,365 for SmolLM2-135M in float32. A longer sample still gets a batch of its own."""
    hidden = int(config.hidden_size)
    widest = max(hidden, int(getattr(config, "intermediate_size", None) or 4 * hidden))
    return max(1, CPU_ACTIVATION_BYTES // (element_bytes * widest))


def device_budget(device: torch.device, config: Any, max_batch_tokens: int | str, gpu_batch_tokens: int | str,
                  element_bytes: int, free_bytes: int | None = None) -> DeviceBudget:
    """The budget on `device`: CPU = `max_batch_tokens` (auto: `cpu_batch_tokens`), 30 MiB logit chunks and
    8 MiB importance blocks;
    CUDA = from free memory (`free_bytes`, measured when not given), or `gpu_batch_tokens` when it is a number."""
    if device.type != "cuda":
        tokens = max_batch_tokens if isinstance(max_batch_tokens, int) else cpu_batch_tokens(config, element_bytes)
        return DeviceBudget(tokens, CPU_LOGIT_CHUNK_ELEMENTS, CPU_CHUNK_ELEMENTS)
    free = free_device_bytes(device) if free_bytes is None else free_bytes
    chunk = int(min(GPU_MAX_CHUNK_ELEMENTS, max(CPU_CHUNK_ELEMENTS, free * CHUNK_SHARE // CHUNK_ELEMENT_BYTES)))
    if isinstance(gpu_batch_tokens, int):
        tokens = gpu_batch_tokens
    else:
        tokens = int(free * ACTIVATION_SHARE) // activation_bytes_per_token(config, element_bytes)
        tokens = max(1, min(GPU_MAX_BATCH_TOKENS, tokens))
    return DeviceBudget(tokens, chunk, chunk)
