"""The train stage's metrics.jsonl read back: one entry per optimizer step (the run record's mean loss, the stats API's
curves, the trainer's own rewind on resume and its manifest's totals). One reader for all of them.

Rank 0 appends one line per step. A run killed mid-write leaves a torn last line (a partial JSON object):
every reader leaves it out, and a resumed run rewrites the file without it before logging again. A damaged
line before the last one is an error naming the file and the line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pipeline.runtime.files import ArtifactError

METRICS = "metrics.jsonl"


def _metric(line: str) -> dict[str, Any] | None:
    """One step's metrics, or None when the line is not one (a torn write)."""
    try:
        metric = json.loads(line, parse_constant=lambda name: None)  # NaN / Infinity: never written, read as bad
    except ValueError:
        return None
    if not isinstance(metric, dict) or not isinstance(metric.get("step"), int):
        return None
    if not all(isinstance(v, (int, str)) or (isinstance(v, float) and math.isfinite(v)) for v in metric.values()):
        return None
    return metric


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every step line of a metrics.jsonl in file order ([] when there is none); a torn last line is left out."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    metrics = []
    for index, (number, line) in enumerate(lines):
        metric = _metric(line)
        if metric is None:
            if index == len(lines) - 1:
                break  # the torn tail of a killed write
            raise ArtifactError(
                f"{path} line {number} is not a step's metrics (a JSON object with an integer step and finite numbers); "
                "the file was damaged: delete it with the train output's checkpoints (train/) and train again"
            )
        metrics.append(metric)
    return metrics


def train_curve(train_output: Path) -> list[dict[str, Any]]:
    """One train stage's metrics.jsonl as one entry per optimizer step (a resumed run's last line of a step wins)."""
    steps: dict[int, dict[str, Any]] = {}
    for metric in read_metrics(Path(train_output) / METRICS):
        steps[int(metric["step"])] = metric
    return [steps[step] for step in sorted(steps)]


def rewind_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps up to `step` (a resumed run logs the later ones again) and drop a torn tail:
    the file is rewritten whole, then renamed into place."""
    path = Path(path)
    if not path.exists():
        return
    kept = [metric for metric in read_metrics(path) if metric["step"] <= step]
    temporary = path.with_name(path.name + ".rewind")
    temporary.write_text("".join(json.dumps(metric, allow_nan=False) + "\n" for metric in kept))
    temporary.replace(path)
