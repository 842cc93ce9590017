"""Per-token NLL from final hidden states, at target positions only, in chunks.

Target token i is predicted from the hidden state at i-1, so the LM head runs on the gathered rows
`hidden[b, i-1]` for the targets alone: no [B, T, V] logits, and no head FLOPs on context tokens.
The head runs in its weights' dtype (bf16 on tensor cores in the full-bf16 mode); the log-softmax
is always float32, since the log-sum-exp over a vocabulary is where bf16 rounding would show.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.runtime.errors import UserError

# Elements of one logits chunk (64 MiB as fp32) for callers that pass no device budget (the trainer's masked
# loss); it bounds the head's transient memory for any vocabulary. The scorer passes its own (device_budget).
LOGIT_CHUNK_ELEMENTS = 1 << 24


def output_head(model: Any) -> tuple[torch.nn.Module, float | None]:
    """The model's LM head and its final-logit soft cap (Gemma-style), if it has one."""
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no output embeddings (LM head); a causal LM is required")
    return head, getattr(model.config, "final_logit_softcapping", None)


def gathered_nll(
    hidden: torch.Tensor,
    predicting: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """-log P(labels[n] | row predicting[n]) as fp32 [N].

    `hidden` [B, T, D] are the final (normed) hidden states, `predicting` [N] flat indices into its
    B*T rows (b*T + i - 1 for target (b, i)), `labels` [N] the target ids. The chunk count follows
    from N alone, so nothing here waits for the device.
    """
    rows = hidden.reshape(-1, hidden.shape[-1])
    count = predicting.shape[0]
    out = torch.empty(count, dtype=torch.float32, device=hidden.device)
    step = max(1, chunk_elements // head.weight.shape[0])
    for start in range(0, count, step):
        chunk = rows[predicting[start : start + step]]
        logits = head(chunk.to(head.weight.dtype)).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        out[start : start + step] = torch.nn.functional.cross_entropy(logits, labels[start : start + step], reduction="none")
    return out


def target_nll(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """-log P(x_i | x_<i) for each True entry of `targets` [B, T], in row-major order, as fp32 [N].

    `hidden` [B, T, D] are the final (normed) hidden states; `targets[:, 0]` must be False. Finds
    the targets on the device (one wait for it); the scorer, which knows them on the host, calls
    `gathered_nll` directly.
    """
    rows, positions = targets.nonzero(as_tuple=True)
    if len(rows) and bool((positions == 0).any()):
        raise ValueError("position 0 cannot be a target: nothing precedes it")
    predicting = rows * targets.shape[1] + positions - 1
    return gathered_nll(hidden, predicting, input_ids[rows, positions], head, softcap, chunk_elements)
