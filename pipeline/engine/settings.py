"""How tokens are scored and selected: the engine's settings, free of torch so configs load fast.

`sstoken --help` and every stage config import this module; the engine that uses it
(pipeline/engine/scorer.py) is imported only when a model actually runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.core.config import StageConfig


class ScoreSettings(StageConfig):
    """How tokens are scored and selected."""

    gamma: float = Field(
        0.5, ge=0.0, le=1.0, description="Weight of the normalised excess loss; 1 - gamma weighs attention importance."
    )
    ratio: float = Field(0.6, gt=0.0, le=1.0, description="Fraction of each sample's trainable tokens to keep (ceil).")
    layer: int = Field(-1, description="Decoder layer whose attention gives importance; negative counts from the last.")
    excess: Literal["history_minus_current", "current_minus_history"] = Field(
        "history_minus_current",
        description="Direction of the excess loss: ssToken uses history_minus_current; Rho-1 (current = training "
        "model, history = reference) and TokenCleaning (current = base, history = reference) use current_minus_history.",
    )
    dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto",
        description="Compute precision. auto = float32. bfloat16 = bf16 matmuls around a float32 residual stream, "
        "norms and LM head (pipeline/engine/precision.py): 1.6-2x faster where the hardware has native bf16, but it "
        "stays opt-in because its keep decisions can differ from float32 (see README, Performance).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the models run: auto = CUDA when present.")
    max_batch_tokens: int = Field(
        16384, ge=1, description="Token budget of one micro-batch, counted with padding (samples x longest length)."
    )
    threads: int | None = Field(None, ge=1, description="CPU threads for torch; default: every core this process may use.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped inside a checkpoint folder to run.")
