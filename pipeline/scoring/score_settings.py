"""How tokens are scored: the engine's settings, free of torch so configs load fast.

`sstoken --help` and every stage config import this module; the engine that uses it
(pipeline/scoring/scorer.py) is imported only when a model actually runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import Field

from pipeline.runtime.config import StageConfig, setting
from pipeline.selection.select_settings import SelectSettings


class ScoreSettings(StageConfig):
    """How the signals are computed: model, layer, precision, batching (selection: `SelectSettings`)."""

    signals: Literal["all", "needed"] = Field(
        "all",
        description="Signals to compute and store: all (REL, when history differs from current, attention, and the current model's entropy), so "
        "`sstoken select` can later apply any method to them, byte-identical to scoring with it; needed: only what "
        "--method uses (no history pass for attention-only methods and loss, confidence, entropy; no attention capture "
        "for REL-only ones; the entropy only for entropy, though it costs no extra pass): faster, but a later "
        "selection that needs a missing signal is refused.",
    )
    layer: int = Field(-1, description="Decoder layer whose attention gives importance; negative counts from the last.")
    excess: Literal["history_minus_current", "current_minus_history"] = Field(
        "history_minus_current",
        description="Direction of the stored excess loss REL: history_minus_current for ssToken and for TokenCleaning "
        "(history = base, current = the newer reference model: loss(base) - loss(reference)); current_minus_history "
        "for Rho-1 (current = the model being trained, history = the reference: loss(current) - loss(reference)).",
    )
    dtype: Literal["auto", "float32", "bfloat16", "bfloat16-full"] = Field(
        "auto",
        description="Compute precision (pipeline/scoring/precision.py). auto = float32 on CPU, bfloat16-full on CUDA. "
        "bfloat16 = mixed: bf16 matmuls around a float32 residual stream, norms and LM head; closest to float32 and "
        "faster on a CPU with native bf16, but its float32 head is slow on a GPU. bfloat16-full = bf16 weights "
        "and activations (tensor cores for every matmul and the LM head), float32 log-sum-exp, importance softmax and "
        "accumulation. Both bf16 modes can flip borderline keep decisions. Speeds and differences measured: README, "
        "Performance.",
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", description="Where the models run: auto = CUDA when present.", run_key=False
    )
    max_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        "auto",
        description="Token budget of one micro-batch on CPU, counted with padding (samples x longest length): auto = "
        "as many tokens as keep one layer's largest activation within 8 MiB (1,365 for SmolLM2-135M in float32; "
        "pipeline/scoring/device_budget.py says why larger CPU batches are slower). On CUDA see gpu_batch_tokens.",
    )
    gpu_batch_tokens: Annotated[int, Field(ge=1)] | Literal["auto"] = setting(
        "auto",
        description="Token budget of one micro-batch on a CUDA device, counted with padding: auto = chosen from the "
        "device's free memory once the model is loaded (pipeline/scoring/device_budget.py), at most 65536.",
        run_key=False,
    )
    threads: int | None = setting(
        None, ge=1, description="CPU threads for torch; default: every core this process may use.", run_key=False
    )
    trust_remote_code: bool = setting(
        False, description="Allow model code shipped inside a checkpoint folder to run.", run_key=False
    )


@dataclass(frozen=True)
class SignalSet:
    """Which signals a score run computes and stores, besides the current NLL it always has.

    rel: a history pass (unless cached or the same checkpoint); attention: the importance capture in the
    current pass; entropy: the current model's predictive entropy, from the logits the current NLL is taken
    from (no extra pass)."""

    rel: bool
    attention: bool
    entropy: bool = False


def signals_to_compute(signals: str, selection: SelectSettings) -> SignalSet:
    """`all`: every signal; `needed`: those `selection`'s method uses."""
    everything = signals == "all"
    return SignalSet(
        rel=everything or selection.needs_rel,
        attention=everything or selection.uses_attention,
        entropy=everything or selection.uses_entropy,
    )
