"""The validate stage's config: what `sstoken validate` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.config import StageConfig, setting


class ValidateConfig(StageConfig):
    """`sstoken validate`: check an artifact folder (or every one under a run folder) against its schema and manifest."""

    folder: Path = setting(
        description="An artifact folder (tokenized, scores, masks, export, train output, a history cache folder) or a "
        "folder holding several (a run folder): each is checked.", run_key=False,
    )
