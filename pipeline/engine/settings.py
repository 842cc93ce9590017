"""How tokens are scored: the engine's settings, free of torch so configs load fast.

`sstoken --help` and every stage config import this module; the engine that uses it
(pipeline/engine/scorer.py) is imported only when a model actually runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.config import StageConfig, setting


class ScoreSettings(StageConfig):
    """How the signals are computed: model, layer, precision, batching (selection: `SelectSettings`)."""

    layer: int = Field(-1, description="Decoder layer whose attention gives importance; negative counts from the last.")
    excess: Literal["history_minus_current", "current_minus_history"] = Field(
        "history_minus_current",
        description="Direction of the stored excess loss REL: history_minus_current for ssToken and for TokenCleaning "
        "(history = base, current = the newer reference model: loss(base) - loss(reference)); current_minus_history "
        "for Rho-1 (current = the model being trained, history = the reference: loss(current) - loss(reference)).",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute precision. auto = float32. bfloat16 = bf16 matmuls around a float32 residual stream, "
        "norms and LM head (pipeline/engine/precision.py): 1.6-2x faster where the hardware has native bf16, but it "
        "stays opt-in because its keep decisions can differ from float32 (see README, Performance).",
    )
    device: Literal["auto", "cpu", "cuda"] = setting(
        "auto", description="Where the models run: auto = CUDA when present.", run_key=False
    )
    max_batch_tokens: int = Field(
        16384, ge=1, description="Token budget of one micro-batch, counted with padding (samples x longest length)."
    )
    threads: int | None = setting(
        None, ge=1, description="CPU threads for torch; default: every core this process may use.", run_key=False
    )
    trust_remote_code: bool = setting(
        False, description="Allow model code shipped inside a checkpoint folder to run.", run_key=False
    )
