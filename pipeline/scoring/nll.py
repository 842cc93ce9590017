"""Per-token NLL from final hidden states, at target positions only, in chunks.

Target token i is predicted from the hidden state at i-1, so the LM head runs on the gathered rows
`hidden[b, i-1]` for the targets alone: no [B, T, V] logits, and no head FLOPs on context tokens.
The head runs in its weights' dtype (bf16 on tensor cores in the full-bf16 mode); the log-softmax
is always float32, since the log-sum-exp over a vocabulary is where bf16 rounding would show.

The predictive entropy of each target row, when asked, comes from the same chunk's float32 log-softmax
(`-sum(p * log p)` over the vocabulary): no second head pass, no more memory than the cross-entropy's own
log-softmax, only one exp and one product-sum over the chunk, small beside the head's matmul (D multiply-adds
per logit).
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
    return gathered_nll_entropy(hidden, predicting, labels, head, softcap, chunk_elements, entropy=False)[0]


def gathered_nll_entropy(
    hidden: torch.Tensor,
    predicting: torch.Tensor,
    labels: torch.Tensor,
    head: torch.nn.Module,
    softcap: float | None = None,
    chunk_elements: int = LOGIT_CHUNK_ELEMENTS,
    *,
    entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`gathered_nll`'s fp32 [N] NLLs and, with `entropy`, each row's predictive entropy in nats (fp32 [N],
    from the same float32 log-softmax; else None). The NLLs are the same bits either way: cross-entropy is
    the negated log-softmax at the label."""
    rows = hidden.reshape(-1, hidden.shape[-1])
    count = predicting.shape[0]
    out = torch.empty(count, dtype=torch.float32, device=hidden.device)
    entropies = torch.empty(count, dtype=torch.float32, device=hidden.device) if entropy else None
    step = max(1, chunk_elements // head.weight.shape[0])
    for start in range(0, count, step):
        chunk = rows[predicting[start : start + step]]
        logits = head(chunk.to(head.weight.dtype)).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        targets = labels[start : start + step]
        if entropies is None:
            out[start : start + step] = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            continue
        log_probs = torch.log_softmax(logits, dim=-1)
        del logits  # at most two [chunk, V] float32 buffers at a time, as cross_entropy holds
        out[start : start + step] = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        entropies[start : start + step] = -(log_probs.exp().mul_(log_probs)).sum(dim=-1)
    return out, entropies


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
