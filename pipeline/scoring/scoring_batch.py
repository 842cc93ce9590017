"""One scoring micro-batch as index arrays, built on the host in one go and uploaded once.

Every index the forward needs (padded ids, the rows that predict each target, each sample's query
positions and turn starts, where each target's importance sits in the padded result) is computed
with numpy from the masks the host already has, so the device never has to be asked how many targets
there are (a `nonzero` or `.item()` would stall the host until the device catches up). The arrays
go to the device at the start of the micro-batch, pinned and non-blocking on CUDA, and the results
come back in one copy at its end.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pipeline.scoring.attention import query_table


@dataclass(frozen=True)
class ScoringBatch:
    """Host arrays of one right-padded micro-batch (B samples, T = the longest, N targets in all)."""

    input_ids: np.ndarray  # [B, T] int64, 0 after each sample
    attention_mask: np.ndarray | None  # [B, T] int64; None when no sample is padded (SDPA's is_causal path)
    predicting: np.ndarray  # [N] flat row b*T + i - 1 that predicts target (b, i), row-major
    labels: np.ndarray  # [N] the target ids
    counts: list[int]  # targets per sample
    query_positions: np.ndarray  # [B, Nmax] trainable positions, padded with 0
    context_end: np.ndarray  # [B, Nmax] their turn starts, padded with 0
    key_length: int  # longest query position + 1
    importance_index: np.ndarray  # [N] flat b*Nmax + k of each target in the padded importance result


def plan_scoring_batch(ids: list[np.ndarray], masks: list[np.ndarray]) -> ScoringBatch:
    """The micro-batch of samples `ids` with trainable masks `masks` (position 0 never trainable)."""
    lengths = [len(x) for x in ids]
    width = max(lengths)
    input_ids = np.zeros((len(ids), width), dtype=np.int64)
    targets = np.zeros((len(ids), width), dtype=bool)
    for row, (sample, mask) in enumerate(zip(ids, masks)):
        input_ids[row, : len(sample)] = sample
        targets[row, : len(mask)] = mask
    flat_targets = np.flatnonzero(targets)
    attention_mask = None
    if min(lengths) < width:
        attention_mask = (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
    positions, context_end, key_length = query_table(masks)
    counts = [int(np.count_nonzero(m)) for m in masks]
    slots = positions.shape[1]
    importance_index = np.concatenate(
        [row * slots + np.arange(n, dtype=np.int64) for row, n in enumerate(counts)] or [np.zeros(0, np.int64)]
    )
    return ScoringBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        predicting=flat_targets - 1,
        labels=input_ids.reshape(-1)[flat_targets],
        counts=counts,
        query_positions=positions,
        context_end=context_end,
        key_length=key_length,
        importance_index=importance_index,
    )


def upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array on `device`: pinned and non-blocking on CUDA, so the host does not wait for the copy."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def split_counts(values: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """A flat per-target array cut into one array per sample."""
    return np.split(values, np.cumsum(counts)[:-1])
