"""The train stage's metrics.jsonl read back: one entry per optimizer step (the run record's mean loss, the stats API's curves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def train_curve(train_output: Path) -> list[dict[str, Any]]:
    """One train stage's metrics.jsonl as one entry per optimizer step (a resumed run's last line of a step wins)."""
    path = Path(train_output) / "metrics.jsonl"
    if not path.is_file():
        return []
    steps: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            metric = json.loads(line)
            steps[int(metric["step"])] = metric
    return [steps[step] for step in sorted(steps)]
