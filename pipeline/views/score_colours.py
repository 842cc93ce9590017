"""One colour scale for scores, shared by the terminal view and the HTML report: light for low, deep orange for high.

Dark text stays readable on every step, so a token's text never disappears into its colour.
"""

from __future__ import annotations

import math

RAMP = ("#eef2f7", "#fdf1d6", "#fddca0", "#fcc46b", "#f9a23d", "#f27f1b", "#e8590c")


def score_level(score: float, low: float, high: float) -> int:
    """The step of RAMP for `score` on the scale [low, high] (clipped; NaN and a flat scale give the lowest)."""
    if score is None or math.isnan(score) or not high > low:
        return 0
    share = min(1.0, max(0.0, (score - low) / (high - low)))
    return min(len(RAMP) - 1, int(share * len(RAMP)))


def score_colour(score: float, low: float, high: float) -> str:
    return RAMP[score_level(score, low, high)]
