"""The exponential moving average of weights, one tensor at a time: what a history model under the ema policy is.

    average_tensor(history, current, alpha)   # alpha * history + (1 - alpha) * current

Shared by the offline loop (`pipeline.loop.ema`, which averages two checkpoints' safetensors) and the online
trainer (`pipeline.training.online_history`, which averages the weights it trains every K steps), so both
average alike: in float32, cast back to the current tensor's dtype.
"""

from __future__ import annotations

import torch


def average_tensor(history: torch.Tensor, current: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * history + (1 - alpha) * current in float32, in the current tensor's dtype; other dtypes: current's."""
    if not current.is_floating_point():
        return current
    return (alpha * history.float() + (1.0 - alpha) * current.float()).to(current.dtype)
