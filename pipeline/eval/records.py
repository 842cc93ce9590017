"""The eval's two records, typed: a cell's measures file and the eval folder's eval.json.

    read_measures(path) -> CellMeasures      # cells/seed-N/NAME.measures.json (`schemas/measures.v1.schema.json`)
    read_eval(folder) -> EvalReport          # EVAL/eval.json (`schemas/eval.v1.schema.json`)

Both are checked against their schema when written and when read; a file that is a folder, not
JSON, or does not match is one error naming the file and the field (`sstoken report EVAL` exits 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from pipeline.runtime.files import read_json_record, write_json_atomic
from pipeline.runtime.schemas import validate_json

EVAL_RECORD = "eval.json"
EVAL_SCHEMA = "eval.v1.schema.json"
MEASURES_SCHEMA = "measures.v1.schema.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)

    def as_json(self) -> dict[str, Any]:
        """The record as its file holds it."""
        return self.model_dump(mode="json", exclude_unset=True)


class RoundSelection(_Record):
    """One round of one cell: the method that selected it and how well it dropped the corrupted tokens."""

    round: int
    selection: str
    warmup: bool
    corrupted_dropped: float | None
    clean_dropped: float | None
    auroc: float | None


class CellMeasures(_Record):
    """A cell's measures file: what `sstoken eval` measured for one method (or the reference, or the base) and seed."""

    identity: str
    seed: int
    method: str
    values: dict[str, int | float | None]
    selection_by_round: list[RoundSelection]
    wall_s: float


class Spread(_Record):
    mean: float | None
    std: float | None
    n: int


class Measure(_Record):
    key: str
    label: str
    higher_is_better: bool | None


class TableRow(_Record):
    method: str
    values: dict[str, Spread]


class RoundSpread(_Record):
    method: str
    round: int
    selection: str
    corrupted_dropped: Spread
    clean_dropped: Spread
    auroc: Spread


class EvalReport(_Record):
    """eval.json: the table of measures over seeds, and the selection quality per round."""

    kind: Literal["eval"]
    schema_version: Literal[1]
    config: dict[str, Any]
    corpus: Literal["task", "natural"]
    seeds: list[int]
    methods: list[str]
    rows: list[str]
    measures: list[Measure]
    table: list[TableRow]
    selection_by_round: list[RoundSpread]
    wall_s: float
    cells_wall_s: float
    cells_run: int


def write_measures(path: Path, measures: dict[str, Any]) -> CellMeasures:
    """A cell's measures file, checked against its schema, written atomically (a reader sees it whole or not at all)."""
    validate_json(measures, MEASURES_SCHEMA, str(path))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(measures, path)
    return CellMeasures.model_validate(measures)


def read_measures(path: Path) -> CellMeasures | None:
    """A cell's measures file; None when there is none (the cell is still to measure)."""
    if not Path(path).exists() and not Path(path).is_symlink():
        return None
    return read_json_record(path, MEASURES_SCHEMA, "a cell's measures file of `sstoken eval`", CellMeasures)


def check_eval(report: dict[str, Any], path: Path) -> EvalReport:
    """eval.json's content as written, checked against its schema."""
    validate_json(report, EVAL_SCHEMA, str(path))
    return EvalReport.model_validate(report)


def read_eval(folder: Path) -> EvalReport:
    """The eval folder's eval.json, typed."""
    return read_json_record(Path(folder) / EVAL_RECORD, EVAL_SCHEMA, "an eval record (eval.json of `sstoken eval`)",
                            EvalReport)
