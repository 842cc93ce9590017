"""The run folder's layout and its `run.json`, the record of the rounds (written atomically).

    RUN/
      run.json                       the run: settings, models, rounds with their checkpoints and figures
      tokenized/                     the prepared corpus (once per tokenizer)
      subset/                        epoch rounds over `samples` of the corpus: that subset (tokenized)
      history_cache/                 NLLs of fixed history checkpoints, keyed by fingerprints
      reference/{tokenized,scores,train}/   a reference model the run trains first (rho1, tokencleaning)
      rounds/rNNN/data/              slice rounds: the round's slice (a tokenized folder)
      rounds/rNNN/history/           history ema: the averaged history model of round N
      rounds/rNNN/scores/            signals of round N (current = round N-1's checkpoint, the base for r000)
      rounds/rNNN/masks/             the selection of round N (`sstoken select --output`)
      rounds/rNNN/train/             the train stage's output: metrics.jsonl, train/ (resumable state), manifest.json
      rounds/rNNN/train/checkpoint/  the model after round N (Hugging Face safetensors + tokenizer)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.runtime.files import utc_now, write_json_atomic

RUN_RECORD = "run.json"
RUN_RECORD_VERSION = 1


@dataclass(frozen=True)
class RunFolder:
    """Where everything of one run lives."""

    root: Path

    @property
    def record(self) -> Path:
        return self.root / RUN_RECORD

    @property
    def tokenized(self) -> Path:
        return self.root / "tokenized"

    @property
    def subset(self) -> Path:
        return self.root / "subset"

    @property
    def history_cache(self) -> Path:
        return self.root / "history_cache"

    def reference(self, part: str) -> Path:
        """reference/tokenized, reference/scores or reference/train."""
        return self.root / "reference" / part

    def round(self, index: int) -> Path:
        return self.root / "rounds" / f"r{index:03d}"

    def data(self, index: int) -> Path:
        return self.round(index) / "data"

    def ema_history(self, index: int) -> Path:
        return self.round(index) / "history"

    def scores(self, index: int) -> Path:
        return self.round(index) / "scores"

    def masks(self, index: int) -> Path:
        return self.round(index) / "masks"

    def train(self, index: int) -> Path:
        return self.round(index) / "train"

    def checkpoint(self, index: int) -> Path:
        return self.train(index) / "checkpoint"

    def relative(self, path: Path) -> str:
        """A path inside the run as run.json writes it (relative, so a moved run folder still reads)."""
        try:
            return str(Path(path).relative_to(self.root))
        except ValueError:
            return str(path)


def read_run_record(folder: RunFolder) -> dict[str, Any] | None:
    """The run's record, or None when the run has not started (or its record is unreadable)."""
    try:
        record = json.loads(folder.record.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("version") == RUN_RECORD_VERSION else None


def write_run_record(folder: RunFolder, record: dict[str, Any]) -> dict[str, Any]:
    """Write run.json atomically (a temporary name, then a rename), stamped with the time."""
    record = record | {"updated_at": utc_now()}
    write_json_atomic(record, folder.record)
    return record
