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
def naive_forward(model, input_ids: np.ndarray, want_attentions: bool = True):
    """model(input_ids, output_attentions=True) on one unpadded sample: full logits [1, T, V] and every
    layer's attention probabilities [1, H, T, T]."""
    ids = torch.as_tensor(np.asarray(input_ids, dtype=np.int64))[None]
    return model(input_ids=ids, output_attentions=want_attentions)


def token_nll(logits: torch.Tensor, input_ids: np.ndarray) -> np.ndarray:
    """nll[i] = -log P(x_i | x_<i) from full logits [1, T, V], one token at a time; NaN at 0."""
    log_probs = torch.log_softmax(logits[0].float(), dim=-1)
    nll = np.full(len(input_ids), np.nan, dtype=np.float64)
    for i in range(1, len(input_ids)):
        nll[i] = -log_probs[i - 1, int(input_ids[i])].item()
    return nll


def naive_scores(
    current,
    history,
    input_ids: np.ndarray,
    trainable: np.ndarray,
    gamma: float = 0.5,
    ratio: float = 0.6,
    layer: int = -1,
    excess: str = "history_minus_current",
    lean: bool = False,
) -> dict[str, np.ndarray]:
    """Scores of one sample; `history` None means history == current (REL = 0).

    The naive way the scoring issue defines: two `model(..., output_attentions=True)` calls with full
    logits, both outputs held while the scores are computed. `lean` (benchmarks only) asks the
    history call for no attentions and drops each output as soon as it is used: the same numbers.
    """
    trainable = np.asarray(trainable, dtype=bool)
    n_tokens = len(input_ids)
    current_out = naive_forward(current, input_ids)
    if lean:
        nll_cur, attention = token_nll(current_out.logits, input_ids), current_out.attentions[layer][0].float().numpy()
        del current_out
        nll_hist = nll_cur
        if history is not None:
            nll_hist = token_nll(naive_forward(history, input_ids, want_attentions=False).logits, input_ids)
    else:
        history_out = naive_forward(history, input_ids) if history is not None else current_out
        nll_cur, nll_hist = token_nll(current_out.logits, input_ids), token_nll(history_out.logits, input_ids)
        attention = current_out.attentions[layer][0].float().numpy()

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
