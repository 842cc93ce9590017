"""The select stage's config: what `sstoken select` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import model_validator

from pipeline.runtime.config import setting
from pipeline.selection.select_settings import SelectSettings


class SelectConfig(SelectSettings):
    """`sstoken select`: a selection method and its settings, applied to a scores folder in place or
    written apart to a masks folder (`output`)."""

    scores: Path = setting(
        description="Scores folder made by `sstoken score`; without --output its score, keep and n_kept columns are "
        "rewritten in place.",
        run_key=False,
    )
    output: Path | None = setting(
        None,
        description="Masks folder to write the selection to (mask shards named as the score shards, a manifest of kind "
        "masks); the scores folder is then left untouched. Default: select in place.",
        run_key=False,
    )
    overwrite: bool = setting(
        False, description="With --output: write into a folder holding other files or masks of other scores or settings "
        "(files of other names are left as they are).", run_key=False,
    )

    @model_validator(mode="after")
    def _overwrite_needs_output(self) -> SelectConfig:
        if self.overwrite and self.output is None:
            raise ValueError("overwrite applies to a masks folder (--output); a selection in place needs none")
        return self
