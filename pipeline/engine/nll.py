"""Per-token NLL from final hidden states, at target positions only, in chunks.

Target token i is predicted from the hidden state at i-1, so the LM head runs on the gathered rows
`hidden[b, i-1]` for the targets alone: no [B, T, V] logits, and no head FLOPs on context tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.core.checkpoints import CheckpointError

# Elements of one fp32 logits chunk (64 MiB): bounds the head's transient memory for any vocabulary.
LOGIT_CHUNK_ELEMENTS = 1 << 24


def output_head(model: Any) -> tuple[torch.nn.Module, float | None]:
    """The model's LM head and its final-logit soft cap (Gemma-style), if it has one."""
    head = model.get_output_embeddings()
    if head is None:
        raise CheckpointError(f"{type(model).__name__} has no output embeddings (LM head); a causal LM is required")
    return head, getattr(model.config, "final_logit_softcapping", None)


def target_nll(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """-log P(x_i | x_<i) for each True entry of `targets` [B, T], in row-major order, as fp32 [N].

    `hidden` [B, T, D] are the final (normed) hidden states; `targets[:, 0]` must be False.
    """
    rows, positions = targets.nonzero(as_tuple=True)
    if len(rows) and bool((positions == 0).any()):
        raise ValueError("position 0 cannot be a target: nothing precedes it")
    out = torch.empty(len(rows), dtype=torch.float32, device=hidden.device)
    vocab = head.weight.shape[0]
    step = max(1, chunk_elements // vocab)
    for start in range(0, len(rows), step):
        b, i = rows[start : start + step], positions[start : start + step]
        logits = head(hidden[b, i - 1]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        out[start : start + step] = torch.nn.functional.cross_entropy(logits, input_ids[b, i], reduction="none")
    return out
