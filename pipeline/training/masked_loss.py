"""The SFT loss on kept tokens: labels from keep masks, and the NLL sum a global batch is normalised by.

Labels follow the unshifted Hugging Face convention: `labels[i] = input_ids[i]` where `keep[i]`,
-100 elsewhere, and token i is predicted from the hidden state at i-1 (the model, or here
`target_nll`, does the shift). Position 0 is never a target: nothing precedes it.

The loss of one optimizer step is the mean NLL over the kept tokens of the WHOLE global batch
(every accumulation micro-batch on every rank): each micro-batch contributes
`sum of its kept-token NLLs / kept tokens of the global batch`, and the gradients of all
micro-batches and ranks are SUMMED. That is transformers 5's `num_items_in_batch` semantics; a mean
per micro-batch instead would weigh a token of a short-response micro-batch more than one of a
long-response micro-batch, and the update would depend on how the batch was split.

Weights: with per-token weights w (the masks' `weight`, 0 where not kept) the loss is
`sum(w_i * nll_i) / sum(w_i)` over the global batch, the same accumulation with the weighted sum in
the numerator and the weight total in place of the kept count. Every binary selection weighs each
kept token 1, and then the weighted loss IS the kept-token mean bit for bit (w * nll is nll, the sum
runs in the same order, and the weight total is the kept count): no separate unweighted path.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.scoring.device_budget import GPU_MAX_CHUNK_ELEMENTS
from pipeline.scoring.nll import LOGIT_CHUNK_ELEMENTS, output_head, target_nll
from pipeline.scoring.signal_forward import decoder_of

IGNORE_INDEX = -100


def masked_labels(input_ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """labels [B, T]: input_ids where keep, IGNORE_INDEX elsewhere and at position 0."""
    labels = torch.where(keep.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    labels[..., 0] = IGNORE_INDEX
    return labels


def kept_count(labels: torch.Tensor) -> int:
    """Targets among `labels`."""
    return int((labels != IGNORE_INDEX).sum())


def target_weight(labels: torch.Tensor, weights: torch.Tensor | None) -> float:
    """The weight total of the targets among `labels` (their count without weights): what a global batch's loss
    is normalised by."""
    if weights is None:
        return float(kept_count(labels))
    return float(weights[labels != IGNORE_INDEX].double().sum())


def masked_nll_sum(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """(sum of w_i * -log P(x_i | x_<i) over the targets of `labels`, number of targets) for one micro-batch;
    `weights` [B, T] (float32, 0 off the targets), or None for 1 at every target.

    The LM head runs on the hidden states that predict a target only (`pipeline.scoring.nll`), with a
    float32 log-softmax: no [B, T, V] logits, no head FLOPs on tokens that are not kept. Autograd keeps
    every chunk's logits for the backward whatever the chunk size, so on CUDA the chunks are large
    (few, tensor-core-sized GEMMs); on CPU they stay at 64 MiB.
    """
    targets = labels != IGNORE_INDEX
    hidden = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    head, softcap = output_head(model)
    chunk = GPU_MAX_CHUNK_ELEMENTS if hidden.device.type == "cuda" else LOGIT_CHUNK_ELEMENTS
    nll = target_nll(hidden, input_ids, targets, head, softcap, chunk)
    if weights is not None:
        nll = nll * weights[targets].to(nll.dtype)  # same order as the targets: row-major, like target_nll's
    return nll.sum(), int(targets.sum())
