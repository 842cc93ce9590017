"""The report's config: what `sstoken report` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.config import StageConfig, setting


class ReportConfig(StageConfig):
    """`sstoken report`: one self-contained HTML page about a run, a scores or masks folder, or an eval folder."""

    folder: Path = setting(
        description="Run folder, scores folder, masks folder, or eval folder (holding eval.json) to report on.",
        run_key=False,
    )
    output: Path = setting(Path("report.html"), description="HTML file to write (one file, opens offline).", run_key=False)
    data: Path | None = setting(
        None, description="Tokenized folder of a scores or masks folder; default: the one its manifest names.",
        run_key=False,
    )
    embed_tokens: int = setting(
        100_000, ge=1_000, description="Most tokens the page embeds as heatmaps (the highest-, lowest- and "
        "middle-scoring samples, then random ones); the totals and plots always cover every sample.", run_key=False,
    )
    seed: int = setting(0, ge=0, description="Seed of the random samples shown.", run_key=False)
    overwrite: bool = setting(
        False, description="Replace an existing file at --output that is not an sstoken report.", run_key=False
    )
