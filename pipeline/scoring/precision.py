"""Compute precision modes, and which one `dtype: auto` means on each device.

Three modes, each named by the string that keys the history cache:
- `float32`: the reference. Everything float32 (on CUDA with TF32 off, so it stays a reference).
- `bfloat16-mixed` (`dtype: bfloat16`): bf16 matmuls around a float32 residual stream, the way
  autocast training runs. The decoder's Linear weights are bf16; embeddings, norms, the residual
  stream and the LM head stay float32; importance is recomputed in float32. Closest to float32 of
  the bf16 modes (98.8% equal keep decisions on SmolLM2, README) and the fastest mode on a CPU with
  native bf16, but on a GPU its float32 LM head runs on no tensor core (60% of a 1B pass on an H200).
- `bfloat16-full` (`dtype: bfloat16-full`, and `auto` on CUDA): bf16 weights and activations, so
  every matmul, the LM head and attention run on tensor cores; float32 only where the scores are
  sensitive: the log-sum-exp of the NLL (`pipeline.scoring.nll`), the softmax of the importance
  recompute (`pipeline.scoring.attention`), and accumulation (the matmul kernels accumulate in fp32;
  RMSNorm upcasts internally).

`dtype: auto` is float32 on CPU (unchanged) and `bfloat16-full` on CUDA.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

FLOAT32 = "float32"
MIXED_BFLOAT16 = "bfloat16-mixed"
FULL_BFLOAT16 = "bfloat16-full"


def precision_name(choice: str, device: torch.device | str = "cpu") -> str:
    """The precision mode a `dtype` setting resolves to on `device`: part of the history cache key.

    `device` may be "auto" (the driver, which may not see the workers' devices): auto then resolves
    as on a CUDA machine when this process sees CUDA.
    """
    device_type = torch.device(device).type if str(device) != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "auto":
        return FULL_BFLOAT16 if device_type == "cuda" else FLOAT32
    if choice == "bfloat16":
        return MIXED_BFLOAT16
    if choice in (FLOAT32, FULL_BFLOAT16):
        return choice
    raise ValueError(f"unknown dtype {choice!r}: expected auto, float32, bfloat16 or bfloat16-full")


def cpu_bfloat16_note(name: str) -> str | None:
    """A note when a bf16 mode is asked for on a CPU (this process's) with no native bf16 instructions.

    Without AVX512_BF16 or AMX, PyTorch emulates bf16 matmuls: on an AVX2-only machine the mixed mode
    measured about 5x slower than float32 (README, Performance).
    """
    if name == FLOAT32:
        return None
    capabilities = torch.cpu.get_capabilities()
    if any(capabilities.get(flag, False) for flag in ("avx512_bf16", "amx_bf16", "sve_bf16", "bf16")):
        return None
    return (f"dtype {name} on a CPU without native bfloat16 (no AVX512_BF16 or AMX): expect it several times "
            "slower than float32; dtype auto is float32 on CPU")


def load_dtype(name: str) -> torch.dtype | str:
    """What to load a checkpoint as: float32, or for the bf16 modes the checkpoint's own dtype ("auto"),
    so a bf16 checkpoint never passes through float32 in full (half the loading memory)."""
    return torch.float32 if name == FLOAT32 else "auto"


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


def apply_precision(model: Any, name: str) -> None:
    """Convert a loaded model's parameters (and buffers) to what mode `name` computes with, in place."""
    if name == MIXED_BFLOAT16:
        to_mixed_precision(model)
    elif name == FULL_BFLOAT16:
        model.to(torch.bfloat16)
    else:
        model.float()


@contextlib.contextmanager
def compute_precision(name: str, device: torch.device) -> Iterator[None]:
    """The region a forward runs in: autocast for the mixed mode; nothing for float32 and full bf16
    (the weights' dtype decides), with TF32 held off on CUDA so float32 stays the reference."""
    if name == MIXED_BFLOAT16:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            yield
    elif device.type == "cuda" and name == FLOAT32:
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
    else:
        yield


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Leave any autocast region: what runs inside sees float32 where its inputs are float32."""
    with torch.autocast(device.type, enabled=False):
        yield
