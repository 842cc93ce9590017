"""Length-sorted, token-budgeted micro-batches: similar lengths together so right padding stays small."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def length_sorted_batches(lengths: Sequence[int], max_batch_tokens: int) -> list[list[int]]:
    """Group sample indices, longest first, so each batch's padded size (count x longest) fits the budget.

    A sample longer than the budget gets a batch of its own. Ties in length keep input order, so the
    grouping is deterministic.
    """
    if max_batch_tokens < 1:
        raise ValueError(f"max_batch_tokens must be at least 1, got {max_batch_tokens}")
    order = sorted(range(len(lengths)), key=lambda index: (-int(lengths[index]), index))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        longest = int(lengths[current[0]]) if current else int(lengths[index])
        if current and (len(current) + 1) * longest > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def right_padded(sequences: Sequence[np.ndarray], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids [B, T] int64, attention_mask [B, T] int64) with padding after each sequence."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        input_ids[row, : len(sequence)] = torch.as_tensor(np.asarray(sequence, dtype=np.int64))
        attention_mask[row, : len(sequence)] = 1
    return input_ids, attention_mask
