"""The embedded demo: fetch the real small model, prepare the bundled corpus, score it on a local Ray.

It lays out a run folder the way later rounds will: `tokenized/`, `history_cache/`,
`rounds/r000/scores/`. Round 0 scores with current == history (the model before any selective
training), so REL is 0 and selection is attention-only, as the method prescribes at the start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

import pipeline
from pipeline.core.config import StageConfig
from pipeline.core.model_zoo import ensure_model
from pipeline.artifacts.stage_output import StageSummary
from pipeline.stages.prepare import PrepareConfig, run_prepare
from pipeline.stages.score import ScoreJobConfig, run_score_job

BUNDLED_CORPUS = Path(pipeline.__file__).resolve().parent.parent / "examples" / "corpus"


class DemoConfig(StageConfig):
    """Settings of `sstoken demo`."""

    output: Path = Field(Path("runs/demo"), description="Run folder: tokenized/, history_cache/, rounds/r000/scores/.")
    corpus: list[Path] = Field(default_factory=lambda: [BUNDLED_CORPUS], description="Corpus files or folders to prepare.")
    model: str = Field("smollm2-135m", description="Known model name (see `sstoken models list`) or a model folder.")
    max_length: int = Field(512, ge=2, description="Longest sample in tokens (longer ones are truncated).")
    gamma: float = Field(0.5, ge=0.0, le=1.0, description="Weight of the normalised excess loss.")
    ratio: float = Field(0.6, gt=0.0, le=1.0, description="Fraction of trainable tokens kept.")
    granularity: Literal["sample", "global"] = Field("sample", description="Keep the top ratio per sample or over the corpus.")
    rows_per_shard: int = Field(128, ge=2, description="Samples per shard: the unit of parallel work and of resumption.")
    workers: int | None = Field(None, ge=1, description="Scoring actors; default: sized to this machine.")


def resolve_model(name_or_folder: str) -> Path:
    folder = Path(name_or_folder)
    return folder if folder.is_dir() else ensure_model(name_or_folder)


def run_demo(config: DemoConfig) -> tuple[StageSummary, StageSummary]:
    missing = [str(p) for p in config.corpus if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(
            f"demo corpus {', '.join(missing)} not found; run from a checkout of sstoken or pass --corpus PATH"
        )
    model = resolve_model(config.model)
    output = Path(config.output)
    prepared = run_prepare(PrepareConfig(
        input=list(config.corpus), tokenizer=str(model), output=output / "tokenized", max_length=config.max_length,
        rows_per_shard=config.rows_per_shard,
    ))
    scored = run_score_job(ScoreJobConfig(
        data=output / "tokenized", current=model, history=model, output=output / "rounds" / "r000" / "scores",
        history_cache=output / "history_cache", gamma=config.gamma, ratio=config.ratio,
        granularity=config.granularity, workers=config.workers,
    ))
    return prepared, scored
