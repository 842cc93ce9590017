"""Selection math: min-max normalisation, the gamma combination and per-sample top-k.

All functions take one sample's full-length arrays (NaN / False off the targets) and return arrays
of the same length, so alignment never changes here.
"""

from __future__ import annotations

import math

import numpy as np

MINMAX_EPSILON = 1e-8


def minmax_normalise(values: np.ndarray, trainable: np.ndarray) -> np.ndarray:
    """(v - min) / (max - min + 1e-8) over the trainable entries; NaN elsewhere."""
    out = np.full(len(values), np.nan, dtype=np.float32)
    if trainable.any():
        selected = values[trainable].astype(np.float64)
        low, high = selected.min(), selected.max()
        out[trainable] = ((selected - low) / (high - low + MINMAX_EPSILON)).astype(np.float32)
    return out


def combine(rel_normalised: np.ndarray, attention: np.ndarray, gamma: float) -> np.ndarray:
    """gamma * REL_n + (1 - gamma) * Attn; a signal whose weight is 0 is ignored (it may be NaN)."""
    if gamma == 1.0:
        return rel_normalised.astype(np.float32, copy=True)
    if gamma == 0.0:
        return attention.astype(np.float32, copy=True)
    return (gamma * rel_normalised.astype(np.float64) + (1.0 - gamma) * attention.astype(np.float64)).astype(
        np.float32
    )


def keep_count(ratio: float, n_trainable: int) -> int:
    """ceil(ratio * n), robust to float noise (0.7 * 10 is 7.000000000000001, which must give 7)."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    return min(n_trainable, math.ceil(round(ratio * n_trainable, 9)))


def sortable_keys(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint32 keys with the same order (NaN maps to 0, below -inf).

    Integer keys make ties exact and let a corpus-wide selection sort or count scores without float
    comparisons.
    """
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    negative = (bits >> 31).astype(bool)
    keys = np.where(negative, ~bits, bits | np.uint32(0x80000000)).astype(np.uint32)
    keys[np.isnan(scores)] = 0
    return keys


def top_k_mask(scores: np.ndarray, trainable: np.ndarray, k: int) -> np.ndarray:
    """Keep the k highest-scoring trainable entries; equal scores go to the earlier position."""
    keep = np.zeros(len(scores), dtype=bool)
    positions = np.flatnonzero(trainable)
    if k <= 0 or len(positions) == 0:
        return keep
    keys = sortable_keys(scores[positions])
    # lexsort: last key is primary. ~keys ascending = score descending; then position ascending.
    order = np.lexsort((positions, ~keys))
    keep[positions[order[:k]]] = True
    return keep

