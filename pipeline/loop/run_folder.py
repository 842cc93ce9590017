"""The run folder's layout and its `run.json`, the record of the rounds (written atomically, typed when read).

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

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.runtime.files import ArtifactError, is_plain_name, read_json_record, utc_now, write_json_atomic
from pipeline.runtime.schemas import validate_json

RUN_RECORD = "run.json"
RUN_RECORD_VERSION = 1
RUN_SCHEMA = "run.v1.schema.json"
# What a run folder holds besides its .lock and _progress/: the run owns these names and nothing else.
RUN_ENTRIES = (RUN_RECORD, "tokenized", "subset", "history_cache", "reference", "rounds")


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

    def inside(self, relative: str | None, field: str = "a path") -> Path:
        """A folder run.json names (relative to the run), checked to stay inside the run folder."""
        parts = Path(relative or "").parts
        if not parts or Path(relative).is_absolute() or not all(is_plain_name(part) for part in parts):
            raise ArtifactError(f"{self.record} names {relative!r} as {field}, which is not a folder inside the run")
        return self.root.joinpath(*parts)


# -- run.json, typed (`schemas/run.v1.schema.json`) -------------------------------------------------


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class ModelEntry(_Record):
    path: str
    fingerprint: str


class ReferenceEntry(ModelEntry):
    trained_by_run: bool


class HistoryModel(ModelEntry):
    policy: str


class HistoryPolicy(_Record):
    policy: str
    alpha: float | None = None


class Selection(_Record):
    """A selection key (`SelectSettings.selection_key()`): the method and the settings that decide the masks."""

    method: str
    ratio: float | None = None


class Models(_Record):
    base: ModelEntry
    reference: ReferenceEntry | None


class StageFigures(_Record):
    """One stage of a round, as the run recorded it when the stage returned."""

    seconds: float
    counts: dict[str, int | float | None]
    notes: list[str]


class RoundSummary(_Record):
    train_loss: float | None
    kept: int | None
    trainable: int | None
    kept_ratio: float | None
    history_computed: int | None
    history_reused: int | None
    score_s: float
    select_s: float
    train_s: float
    rescore_to_train: float | None


class RoundSchedule(_Record):
    start_step: int
    total_steps: int


class RunSchedule(_Record):
    total_steps: int
    steps_per_round: list[int]


class RoundEntry(_Record):
    """One round of run.json. Folders are relative to the run folder (`RunFolder.inside` resolves them)."""

    round: int
    epoch: int
    slice: int | None
    samples: int
    status: Literal["running", "done"]
    stages: dict[str, StageFigures]
    data: str | None = None
    scores: str | None = None
    masks: str | None = None
    checkpoint: str | None = None
    current: ModelEntry | None = None
    history: HistoryModel | None = None
    train_from: str | None = None
    selection: Selection | None = None
    warmup: str | None = None
    schedule: RoundSchedule | None = None
    checkpoint_fingerprint: str | None = None
    summary: RoundSummary | None = None


class RunRecord(_Record):
    """run.json: what every reader of a run folder (cli run/demo, eval, report, inspect, stats) reads it as."""

    version: Literal[1]
    created_at: str
    updated_at: str
    status: Literal["running", "done"]
    identity: str
    settings: dict[str, Any]
    config: dict[str, Any]
    round_unit: Literal["slice", "epoch"]
    history: HistoryPolicy
    selection: Selection
    models: Models
    rounds: list[RoundEntry]
    schedule: RunSchedule | None = None
    samples: int | None = None

    def as_json(self) -> dict[str, Any]:
        """The record as run.json holds it."""
        return self.model_dump(mode="json", exclude_unset=True)


def read_run_record(folder: RunFolder) -> RunRecord | None:
    """The run's record; None when the run has not started (no run.json). A run.json that is a folder, not JSON, or
    does not match `schemas/run.v1.schema.json` is one ArtifactError/SchemaError naming the file and the field."""
    if not folder.record.exists() and not folder.record.is_symlink():
        return None
    return read_json_record(folder.record, RUN_SCHEMA, "a run record (run.json of `sstoken run`)", RunRecord)


def write_run_record(folder: RunFolder, record: dict[str, Any]) -> dict[str, Any]:
    """Write run.json atomically (a temporary name, then a rename), stamped with the time, after checking it against
    its schema (a record the readers would refuse is a bug here, not later)."""
    record = record | {"updated_at": utc_now()}
    validate_json(record, RUN_SCHEMA, str(folder.record))
    write_json_atomic(record, folder.record)
    return record
