"""The inspect view's config: what `sstoken inspect` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from pipeline.runtime.config import StageConfig, setting


class InspectConfig(StageConfig):
    """`sstoken inspect`: samples' tokens coloured by score in the terminal, with their numbers."""

    folder: Path = setting(description="Run folder, scores folder or masks folder.", run_key=False)
    sample: list[str] = setting([], description="Sample ids to show.", run_key=False)
    top: int | None = setting(None, ge=1, description="Show the N samples of highest mean score.", run_key=False)
    bottom: int | None = setting(None, ge=1, description="Show the N samples of lowest mean score.", run_key=False)
    random: int | None = setting(None, ge=1, description="Show N samples drawn at random (--seed).", run_key=False)
    seed: int = setting(0, ge=0, description="Seed of --random.", run_key=False)
    round: int | None = setting(None, ge=0, description="Round of a run folder to show; default: its last.", run_key=False)
    data: Path | None = setting(
        None, description="Tokenized folder of a scores or masks folder; default: the one its manifest names.",
        run_key=False,
    )
    numbers: bool = setting(True, description="Print each target's numbers in a table under the tokens.", run_key=False)

    @model_validator(mode="after")
    def _something_to_show(self) -> InspectConfig:
        if not (self.sample or self.top or self.bottom or self.random):
            raise ValueError("say which samples to show: --sample ID, --top N, --bottom N or --random N")
        return self
