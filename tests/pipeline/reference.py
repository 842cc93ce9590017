"""A deliberately naive ssToken scorer: the ground truth the fast engine is checked against.

Eager attention with output_attentions=True, full-vocabulary logits, one sample at a time, no
padding, plain Python loops over tokens. It shares no code with `pipeline/` on purpose.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM


def load_eager(path: Path | str, dtype: torch.dtype = torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager").eval()


@torch.no_grad()
def naive_forward(model, input_ids: np.ndarray, layer: int, want_attention: bool = True):
    """(nll [T] with NaN at 0, attention probabilities [H, T, T] of `layer` or None) for one sample."""
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
    out = model(input_ids=ids, output_attentions=want_attention)
    log_probs = torch.log_softmax(out.logits[0].float(), dim=-1)
    nll = np.full(ids.shape[1], np.nan, dtype=np.float64)
    for i in range(1, ids.shape[1]):
        nll[i] = -log_probs[i - 1, ids[0, i]].item()
    attention = out.attentions[layer][0].float().numpy() if want_attention else None
    return nll, attention


def naive_scores(
    current,
    history,
    input_ids: np.ndarray,
    trainable: np.ndarray,
    gamma: float = 0.5,
    ratio: float = 0.6,
    layer: int = -1,
    excess: str = "history_minus_current",
) -> dict[str, np.ndarray]:
    """Scores of one sample; `history` None means history == current (REL = 0)."""
    trainable = np.asarray(trainable, dtype=bool)
    n_tokens = len(input_ids)
    nll_cur, attention = naive_forward(current, input_ids, layer)
    nll_hist = naive_forward(history, input_ids, layer, want_attention=False)[0] if history is not None else nll_cur

    targets = [i for i in range(n_tokens) if trainable[i]]
    nan = np.full(n_tokens, np.nan)
    rel, attn, score = nan.copy(), nan.copy(), nan.copy()
    for i in targets:
        rel[i] = nll_hist[i] - nll_cur[i] if excess == "history_minus_current" else nll_cur[i] - nll_hist[i]
        # The assistant turn containing i starts after the last non-trainable position before i.
        turn_start = i
        while turn_start > 0 and trainable[turn_start - 1]:
            turn_start -= 1
        # Row i (x_i is the input there): probability mass on keys before the turn, mean over heads.
        attn[i] = attention[:, i, :turn_start].astype(np.float64).sum(axis=1).mean()
    if targets:
        low = min(rel[i] for i in targets)
        high = max(rel[i] for i in targets)
        for i in targets:
            score[i] = gamma * (rel[i] - low) / (high - low + 1e-8) + (1 - gamma) * attn[i]
    k = math.ceil(round(ratio * len(targets), 9))
    ranked = sorted(targets, key=lambda i: (-score[i], i))
    keep = np.zeros(n_tokens, dtype=bool)
    keep[ranked[:k]] = True
    return {"nll_cur": np.where(trainable, nll_cur, np.nan), "nll_hist": np.where(trainable, nll_hist, np.nan),
            "rel": rel, "attn": attn, "score": score, "keep": keep}
