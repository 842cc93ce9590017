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

from pipeline.engine.precision import full_precision

ATTENTION_IMPLEMENTATION = "sstoken_sdpa"
REQUEST_KWARG = "sstoken_importance"
# Elements of one fp32 score block [H, queries, keys] (64 MiB).
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

    queries[b]: positions of sample b's trainable tokens; context_end[b]: their turn starts (keys
    j < context_end are context). result[b] is filled with fp32 importances, one per query.
    """

    layer_idx: int
    queries: list[torch.Tensor]
    context_end: list[torch.Tensor]
    block_elements: int = SCORE_BLOCK_ELEMENTS
    result: list[torch.Tensor] | None = field(default=None)

    @classmethod
    def for_batch(cls, layer_idx: int, trainable: list[np.ndarray], device: torch.device) -> "ImportanceRequest":
        queries, context_end = [], []
        for mask in trainable:
            positions = np.flatnonzero(mask)
            queries.append(torch.as_tensor(positions, dtype=torch.long, device=device))
            context_end.append(torch.as_tensor(turn_starts(mask)[positions], dtype=torch.long, device=device))
        return cls(layer_idx=layer_idx, queries=queries, context_end=context_end)


def context_attention_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    scaling: float,
    positions: torch.Tensor,
    context_end: torch.Tensor,
    block_elements: int = SCORE_BLOCK_ELEMENTS,
) -> torch.Tensor:
    """Importance of each query position for one sample.

    query [H, T, d] and key [H_kv, T, d] are post-RoPE; query head h uses key head h // (H / H_kv),
    as transformers' repeat_kv does. Keys are causal (j <= i); with right padding a real query never
    sees a padding key. Computed in fp32.
    """
    n = len(positions)
    heads, _, dim = query.shape
    kv_heads = key.shape[0]
    groups = heads // kv_heads
    out = torch.empty(n, dtype=torch.float32, device=query.device)
    if n == 0:
        return out
    length = int(positions.max()) + 1
    keys = key[:, :length].float()  # [H_kv, L, d]
    key_index = torch.arange(length, device=query.device)
    block = max(1, block_elements // (heads * length))
    for start in range(0, n, block):
        rows = positions[start : start + block]
        ends = context_end[start : start + block]
        q = query[:, rows].float().reshape(kv_heads, groups * len(rows), dim)  # heads grouped by key head
        scores = torch.matmul(q, keys.transpose(1, 2)).view(kv_heads, groups, len(rows), length) * scaling
        scores = scores.masked_fill(key_index > rows[:, None], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        in_context = (key_index < ends[:, None]).to(probabilities.dtype)
        mass = (probabilities * in_context).sum(-1)  # [H_kv, groups, rows]
        out[start : start + block] = mass.mean(dim=(0, 1))
    return out


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
        with full_precision(query.device):  # float32 even inside a mixed-precision forward
            request.result = [
                context_attention_mass(
                    query[b], key[b], scale, request.queries[b], request.context_end[b], request.block_elements
                )
                for b in range(len(request.queries))
            ]
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def register_importance_attention() -> str:
    """Register the wrapped attention and its mask function (SDPA's) under one name; returns it.

    Without the mask registration transformers would build no mask for an unknown name and silently
    lose causality and padding.
    """
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, importance_sdpa_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, sdpa_mask)
    return ATTENTION_IMPLEMENTATION
