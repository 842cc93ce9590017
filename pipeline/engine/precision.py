"""Compute precision: float32, or bfloat16 matrix multiplies around a float32 residual stream.

Plain bf16 models (every tensor bf16) round the residual stream at every layer, and the scores drift:
on SmolLM2-135M they agreed with float32 on ~97.9% of keep decisions. The `bfloat16` mode here is
mixed instead, the way autocast training runs:
- the decoder's Linear weights are stored in bf16 and their matmuls run in bf16 (the FLOPs);
- embeddings, norms, the residual stream and the LM head stay float32, and the per-token NLL is
  taken from float32 logits; importance is recomputed in float32 (pipeline.engine.attention);
- `torch.autocast` casts activations to bf16 where a matmul takes them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

MIXED_BFLOAT16 = "bfloat16-mixed"


def precision_name(choice: str) -> str:
    """The resolved precision of a `dtype` setting ("float32" or "bfloat16-mixed"): part of the history cache key."""
    return MIXED_BFLOAT16 if choice == "bfloat16" else "float32"


def load_dtype(name: str) -> torch.dtype | str:
    """What to load a checkpoint as: float32, or for the mixed mode the checkpoint's own dtype ("auto"),
    so a bf16 checkpoint never passes through float32 in full (half the loading memory)."""
    return "auto" if name == MIXED_BFLOAT16 else torch.float32


def to_mixed_precision(model: Any) -> None:
    """Decoder Linear weights to bf16; every other parameter (LM head, embeddings, norms) to float32.

    Parameter by parameter, so a bf16-loaded model never holds a full float32 copy; converting bf16
    or float32 values to float32 is exact.
    """
    head = model.get_output_embeddings()
    matmul_weights: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)
            matmul_weights.update(id(p) for p in module.parameters())
    for parameter in model.parameters():
        if id(parameter) not in matmul_weights and parameter.is_floating_point():
            parameter.data = parameter.data.float()


@contextlib.contextmanager
def compute_precision(name: str, device: torch.device) -> Iterator[None]:
    """The autocast region a forward runs in: bf16 matmuls for the mixed mode, nothing for float32."""
    if name == MIXED_BFLOAT16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    else:
        yield


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Leave any autocast region: what runs inside sees float32 where its inputs are float32."""
    with torch.autocast(device.type, enabled=False):
        yield
