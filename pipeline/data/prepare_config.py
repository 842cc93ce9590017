"""The prepare stage's config: what `sstoken prepare` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from pipeline.runtime.config import StageConfig, setting


class PrepareConfig(StageConfig):
    """Settings of `sstoken prepare`."""

    input: list[Path] = setting(
        description="Input files or folders: JSONL, JSON, Parquet, or a datasets save_to_disk folder.", run_key=False
    )
    tokenizer: str = Field(description="Tokenizer folder (usually the model folder) whose chat template renders the samples.")
    output: Path = setting(
        description="Output folder for part-NNNNN.parquet shards, rejected.parquet and manifest.json.", run_key=False
    )
    max_length: int | None = Field(2048, description="Longest sample in tokens (none: no limit); longer ones are handled per --on-overflow.")
    on_overflow: Literal["truncate", "reject"] = Field("truncate", description="What to do with samples over max_length.")
    rows_per_shard: int = Field(10_000, description="Samples per output shard.")
    max_row_bytes: int = Field(
        4 * 1024 * 1024,
        description="Largest raw row in bytes (a JSONL line, a JSON array entry, the text of a Parquet or datasets row); "
        "larger rows are rejected as row_too_large before they are parsed or tokenized.",
    )
    add_bos: bool = Field(
        False,
        description="Put the tokenizer's BOS token in front of every sample whose rendering does not start with it "
        "(for chat templates that leave it out; ChatML has none). A context token, never trained on.",
    )
    chat_template: Path | None = Field(None, description="Jinja chat template file, for tokenizers without one (or to override it).")
    trust_remote_code: bool = Field(False, description="Allow the tokenizer folder's own Python code to run.")
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or a corpus made from other inputs or "
        "settings (files of other names are left as they are).", run_key=False
    )

    @field_validator("max_length", "rows_per_shard")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 2:
            raise ValueError("must be at least 2")
        return value

    @field_validator("max_row_bytes")
    @classmethod
    def _at_least_one_byte(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value
