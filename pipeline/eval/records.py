"""The eval's two records, typed: a cell's measures file and the eval folder's eval.json.

    read_measures(path) -> CellMeasures      # cells/seed-N/NAME.measures.json (`schemas/measures.v2.schema.json`)
    read_eval(folder) -> EvalReport          # EVAL/eval.json (`schemas/eval.v2.schema.json`)

Version 2 (this one): slice rounds measured after the warm-up, the oracle and the power gate,
selection measures that fit per-sample selection (AUROC within corrupted samples, drop share of
the oracle's, pooled AUROC for a global selection only), kept tokens and optimizer steps.

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
EVAL_VERSION = 2
MEASURES_VERSION = 2
EVAL_SCHEMA = f"eval.v{EVAL_VERSION}.schema.json"
MEASURES_SCHEMA = f"measures.v{MEASURES_VERSION}.schema.json"


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
    measured: bool  # one of the rounds the cell's selection measures pool
    corrupted_dropped: float | None
    drop_share: float | None
    auroc_within: float | None
    auroc_pooled: float | None


class CellMeasures(_Record):
    """A cell's measures file: what `sstoken eval` measured for one row (or the reference, or the base) and seed."""

    schema_version: Literal[2]
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
    measured: bool
    corrupted_dropped: Spread
    drop_share: Spread
    auroc_within: Spread
    auroc_pooled: Spread


class PowerGate(_Record):
    """One outcome measure's gate: does oracle - full exceed 3 x the seed spread (`pipeline.eval.power`)?"""

    key: str
    label: str
    seeds: int
    difference: float | None
    spread: float | None
    threshold: float | None
    passes: bool
    verdict: str


class EvalReport(_Record):
    """eval.json: the table of measures over seeds, the power gate and its verdict, the selection per round."""

    kind: Literal["eval"]
    schema_version: Literal[2]
    config: dict[str, Any]
    corpus: Literal["task", "natural"]
    seeds: list[int]
    methods: list[str]
    rows: list[str]
    measures: list[Measure]
    table: list[TableRow]
    power: list[PowerGate]
    spread_definition: str
    verdict: str
    ranking: dict[str, list[str]]
    kinds: list[str]
    max_new_tokens: dict[str, int | None]
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
