"""One forward of a model over a scoring micro-batch: every target's NLL, and the chosen layer's importance and the
predictive entropy when asked. The scorer and the online trainer both run this one function.

    nll, importance, entropy = signal_forward(model, plan, device, options)

`plan` is the host-side index plan of the micro-batch (`pipeline.scoring.scoring_batch`). The NLLs come from
the final hidden states gathered at the rows that predict a target (`pipeline.scoring.nll`), the importance
from the attention function the model runs (`pipeline.scoring.attention`: a request rides along in the
forward's kwargs and the chosen layer recomputes its probabilities, under no-grad). Under autograd (the
trainer) the NLLs keep their graph, so the loss of the kept tokens backpropagates through the same forward
that scored them; under inference mode (the scorer) nothing is kept. Precision: the caller's region, or a
region for the decoder alone (the scorer's mixed mode keeps the LM head out of autocast).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.scoring.attention import REQUEST_KWARG, SCORE_BLOCK_ELEMENTS, ImportanceRequest
from pipeline.scoring.nll import LOGIT_CHUNK_ELEMENTS, gathered_nll_entropy, output_head
from pipeline.scoring.scoring_batch import ScoringBatch, upload


@dataclass(frozen=True)
class ForwardOptions:
    """What one forward computes besides the NLLs, and its chunk sizes.

    layer_idx: the decoder layer whose attention gives importance (None: no importance; the model must run the
    attention implementation `register_importance_attention` names). entropy: the targets' predictive entropy.
    """

    layer_idx: int | None = None
    entropy: bool = False
    block_elements: int = SCORE_BLOCK_ELEMENTS
    logit_chunk_elements: int = LOGIT_CHUNK_ELEMENTS
    matmul_dtype: torch.dtype = torch.float32


def decoder_of(model: Any) -> torch.nn.Module:
    """The model body without the LM head (`model.model` for Llama, Qwen2, ...)."""
    return getattr(model, model.base_model_prefix)


def signal_forward(
    model: Any, plan: ScoringBatch, device: torch.device, options: ForwardOptions,
    decoder_precision: contextlib.AbstractContextManager | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(NLL [N], importance [N] or None, entropy [N] or None) of the plan's N targets, row-major, fp32.

    `decoder_precision`: the region the decoder alone runs in (the scorer's mixed mode: autocast around the body,
    the LM head outside it, on float32 inputs); None: the caller's region covers both (the trainer's autocast)."""
    input_ids = upload(plan.input_ids, device)
    # No padding: pass no mask, so SDPA can take its is_causal path.
    mask = upload(plan.attention_mask, device) if plan.attention_mask is not None else None
    request = None
    if options.layer_idx is not None:
        request = ImportanceRequest(
            options.layer_idx, upload(plan.query_positions, device), upload(plan.context_end, device), plan.key_length,
            block_elements=options.block_elements, matmul_dtype=options.matmul_dtype,
        )
    extra = {REQUEST_KWARG: request} if request is not None else {}
    with decoder_precision if decoder_precision is not None else contextlib.nullcontext():
        hidden = decoder_of(model)(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra).last_hidden_state
    head, softcap = output_head(model)
    nll, entropy = gathered_nll_entropy(
        hidden, upload(plan.predicting, device), upload(plan.labels, device), head, softcap,
        options.logit_chunk_elements, entropy=options.entropy,
    )
    importance = None
    if request is not None:
        if request.result is None:
            raise RuntimeError(
                f"layer {options.layer_idx} never reached the importance attention function; "
                f"{type(model).__name__} may not use transformers' attention interface"
            )
        importance = request.result.reshape(-1)[upload(plan.importance_index, device)]
    return nll, importance, entropy
