"""Attention importance: the attention mass a trainable token puts on its context, in one layer.

The model keeps running SDPA. We register an attention function that wraps SDPA and, in the chosen
layer only, recomputes attention probabilities for the trainable query rows against the keys
(post-RoPE, GQA heads shared rather than copied), in query blocks. Nothing of size [H, T, T] is kept
for any layer, and the other layers pay nothing.

Importance of target i (query row i, where x_i is the input, as in the authors' code):
    mean over query heads h of  sum_{j < turn_start(i)} softmax_{j <= i}(q_i . k_j * scaling)
where turn_start(i) is the first position of the run of trainable tokens that contains i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pipeline.scoring.precision import full_precision

ATTENTION_IMPLEMENTATION = "sstoken_sdpa"
REQUEST_KWARG = "sstoken_importance"
# Elements of one fp32 score block [B, H, queries, keys] on CPU (64 MiB).
SCORE_BLOCK_ELEMENTS = 1 << 24


def turn_starts(trainable: np.ndarray) -> np.ndarray:
    """For each position, the start of the maximal trainable run containing it (-1 off the runs)."""
    trainable = np.asarray(trainable, dtype=bool)
    starts = np.full(len(trainable), -1, dtype=np.int64)
    begins = np.flatnonzero(trainable & ~np.concatenate(([False], trainable[:-1])))
    if len(begins):
        run_of = np.searchsorted(begins, np.arange(len(trainable)), side="right") - 1
        starts[trainable] = begins[run_of[trainable]]
    return starts


@dataclass
class ImportanceRequest:
    """What the wrapped attention should compute in one forward, and where the result lands.

    positions [B, N]: each sample's trainable positions, padded with 0 to the batch's largest count
    N; context_end [B, N]: their turn starts (keys j < context_end are context), padded with 0, so a
    padding entry has mass 0 and no NaN. key_length: the longest position + 1 in the batch, known on
    the host so the recompute never asks the device. matmul_dtype: what QK^T runs in (float32, or
    bfloat16 on tensor cores); the softmax is float32 either way. result [B, N]: fp32 importances.
    """

    layer_idx: int
    positions: torch.Tensor
    context_end: torch.Tensor
    key_length: int
    block_elements: int = SCORE_BLOCK_ELEMENTS
    matmul_dtype: torch.dtype = torch.float32
    result: torch.Tensor | None = field(default=None)

    @classmethod
    def for_batch(
        cls, layer_idx: int, trainable: list[np.ndarray], device: torch.device, **options: Any
    ) -> "ImportanceRequest":
        positions, context_end, key_length = query_table(trainable)
        return cls(
            layer_idx=layer_idx,
            positions=torch.as_tensor(positions, device=device),
            context_end=torch.as_tensor(context_end, device=device),
            key_length=key_length,
            **options,
        )

    def per_sample(self, counts: list[int]) -> list[torch.Tensor]:
        """The result as one tensor per sample (its `counts[b]` real entries)."""
        if self.result is None:
            raise RuntimeError(f"layer {self.layer_idx} never reached the importance attention function")
        return [self.result[b, :n] for b, n in enumerate(counts)]


def query_table(trainable: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, int]:
    """(positions [B, N], context_end [B, N], key_length) of a batch's trainable masks, padded with 0."""
    width = max((int(np.count_nonzero(m)) for m in trainable), default=0)
    positions = np.zeros((len(trainable), width), dtype=np.int64)
    context_end = np.zeros((len(trainable), width), dtype=np.int64)
    for row, mask in enumerate(trainable):
        found = np.flatnonzero(mask)
        positions[row, : len(found)] = found
        context_end[row, : len(found)] = turn_starts(mask)[found]
    return positions, context_end, int(positions.max()) + 1 if positions.size else 1


def batched_context_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    positions: torch.Tensor,
    context_end: torch.Tensor,
    key_length: int,
    block_elements: int = SCORE_BLOCK_ELEMENTS,
    matmul_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Importance of each query position of every sample of a batch, as fp32 [B, N].

    query [B, H, T, d] and key [B, H_kv, T, d] are post-RoPE; query head h uses key head h // (H / H_kv),
    as transformers' repeat_kv does (keys are shared, not copied). Keys are causal (j <= i); with right
    padding a real query never sees a padding key. Blocks of query columns span the whole batch, so a
    block is one batched matmul whatever the number of samples; QK^T runs in `matmul_dtype` (its
    kernels accumulate in fp32), the scores are scaled, masked and softmaxed in fp32.
    """
    batch, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    count = positions.shape[1]
    out = torch.empty(batch, count, dtype=torch.float32, device=query.device)
    if count == 0:
        return out
    keys = key[:, :, :key_length].to(matmul_dtype).transpose(-1, -2)  # [B, H_kv, d, L]
    key_index = torch.arange(key_length, device=query.device)
    block = max(1, block_elements // (batch * heads * key_length))
    for start in range(0, count, block):
        rows = positions[:, start : start + block]  # [B, n]
        ends = context_end[:, start : start + block]
        width = rows.shape[1]
        gather = rows[:, None, :, None].expand(batch, heads, width, dim)
        q = query.gather(2, gather).to(matmul_dtype).reshape(batch, kv_heads, groups * width, dim)
        scores = torch.matmul(q, keys).float().view(batch, kv_heads, groups, width, key_length) * scaling
        scores = scores.masked_fill(key_index > rows[:, None, None, :, None], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        in_context = (key_index < ends[:, None, None, :, None]).to(probabilities.dtype)
        mass = (probabilities * in_context).sum(-1)  # [B, H_kv, groups, n]
        out[:, start : start + block] = mass.mean(dim=(1, 2))
    return out


def context_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    positions: torch.Tensor,
    context_end: torch.Tensor,
    block_elements: int = SCORE_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Importance of each query position for one sample (query [H, T, d], key [H_kv, T, d]), fp32 [n]."""
    if len(positions) == 0:
        return torch.empty(0, dtype=torch.float32, device=query.device)
    key_length = int(positions.max()) + 1
    return batched_context_attention_mass(
        query[None].float(), key[None].float(), scaling, positions[None], context_end[None], key_length, block_elements
    )[0]


def importance_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, plus the importance recompute in the requested layer when a request rides along."""
    request: ImportanceRequest | None = kwargs.pop(REQUEST_KWARG, None)
    if request is not None and getattr(module, "layer_idx", None) == request.layer_idx:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        # float32 softmax even inside a mixed-precision forward; no graph: the importance only ranks tokens, even
        # when the forward it rides along in trains (the online trainer's)
        with full_precision(query.device), torch.no_grad():
            request.result = batched_context_attention_mass(
                query, key, scale, request.positions, request.context_end, request.key_length,
                request.block_elements, request.matmul_dtype,
            )
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_importance_attention() -> str:
    """Register the wrapped attention and its mask function (SDPA's) under one name; returns it.

    Without the mask registration transformers would build no mask for an unknown name and silently
    lose causality and padding.
    """
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, importance_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    return ATTENTION_IMPLEMENTATION
