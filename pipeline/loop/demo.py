"""The embedded demo: fetch the real small model, prepare the bundled corpus, score it on a local Ray.

It lays out a run folder the way later rounds will: `tokenized/`, `history_cache/`,
`rounds/r000/scores/`. Round 0 scores with current == history (the model before any selective
training), so REL is 0 and selection is attention-only, as the method prescribes at the start.

`DemoConfig` is a run config: its `prepare:` and `score:` sections are the stages' own configs,
with demo defaults; the paths that tie the stages together (the run folder's layout, the model as
tokenizer, current and history) are filled in from the demo's own `output` and `model`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import Field

import pipeline
from pipeline.core.config import ConfigError, SectionedConfig
from pipeline.core.model_zoo import ensure_model, model_dir
from pipeline.stages.configs import PrepareConfig, ScoreJobConfig

if TYPE_CHECKING:
    from pipeline.artifacts.stage_output import StageSummary

BUNDLED_CORPUS = Path(pipeline.__file__).resolve().parent.parent / "examples" / "corpus"


def model_folder(name_or_folder: str) -> Path:
    """The folder a model argument names: the folder itself, or where a known model is (or will be) cached."""
    folder = Path(name_or_folder)
    return folder if folder.is_dir() else model_dir(name_or_folder)


def resolve_model(name_or_folder: str) -> Path:
    """The model's folder, fetching a known model into the cache first if needed."""
    folder = Path(name_or_folder)
    return folder if folder.is_dir() else ensure_model(name_or_folder)


class DemoConfig(SectionedConfig):
    """Settings of `sstoken demo`: the run folder, corpus and model, and the stages' own sections."""

    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {"prepare": {"max_length": 512, "rows_per_shard": 128}}
    derived_fields: ClassVar[dict[str, tuple[str, ...]]] = {
        "prepare": ("input", "tokenizer", "output"),
        "score": ("data", "current", "history", "output", "history_cache"),
    }

    output: Path = Field(Path("runs/demo"), description="Run folder: tokenized/, history_cache/, rounds/r000/scores/.")
    corpus: list[Path] = Field(default_factory=lambda: [BUNDLED_CORPUS], description="Corpus files or folders to prepare.")
    model: str = Field("smollm2-135m", description="Known model name (see `sstoken models list`) or a model folder.")
    prepare: PrepareConfig = Field(description="The prepare stage: the corpus into RUN/tokenized.")
    score: ScoreJobConfig = Field(description="The score stage, round 0: RUN/tokenized into RUN/rounds/r000/scores.")

    @classmethod
    def derived_settings(cls, top: dict[str, Any]) -> dict[str, dict[str, Any]]:
        run, model = Path(top["output"]), model_folder(str(top["model"]))
        return {
            "prepare": {"input": top["corpus"], "tokenizer": str(model), "output": run / "tokenized"},
            "score": {
                "data": run / "tokenized",
                "current": model,
                "history": model,
                "output": run / "rounds" / "r000" / "scores",
                "history_cache": run / "history_cache",
            },
        }


@dataclass(frozen=True)
class DemoRun:
    """What the demo did: both stages' summaries, and the model folder it scored with."""

    prepared: StageSummary
    scored: StageSummary
    model: Path


def run_demo(config: DemoConfig) -> DemoRun:
    """Prepare, then score round 0; the model is fetched first when it is a known name not cached yet."""
    # The stages' code (torch, pyarrow) loads only when the demo runs, not for `sstoken demo --help`.
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.score import run_score_job

    missing = [str(p) for p in config.corpus if not Path(p).exists()]
    if missing:
        raise ConfigError(
            f"demo corpus {', '.join(missing)} not found; run from a checkout of sstoken or pass --corpus PATH"
        )
    model = resolve_model(config.model)
    return DemoRun(prepared=run_prepare(config.prepare), scored=run_score_job(config.score), model=model)
