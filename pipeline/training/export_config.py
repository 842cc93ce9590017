"""The export stage's config: what `sstoken export` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pipeline.runtime.config import StageConfig, setting


class ExportConfig(StageConfig):
    """`sstoken export`: tokens and keep masks joined into self-contained training data for any trainer.

    None of these fields is part of the run key: data and masks enter it by fingerprint, and the
    format and the handling of samples without a kept token by the export's identity.
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    masks: Path = setting(
        description="Keep masks: a scores folder (`sstoken score` / `sstoken select`) or a masks folder "
        "(`sstoken select --output`) made from --data.", run_key=False,
    )
    format: Literal["hf", "jsonl", "parquet"] = setting(
        description="hf: a `datasets` folder (`datasets.load_from_disk(OUT)`); jsonl: part-NNNNN.jsonl, one JSON object "
        "per line; parquet: part-NNNNN.parquet. Each row: sample_id, source, input_ids, attention_mask, labels (-100 "
        "where a token is not kept), n_tokens, n_kept.", run_key=False,
    )
    output: Path = setting(description="Output folder: the data files and manifest.json (written last).", run_key=False)
    without_kept: Literal["skip", "keep"] = setting(
        "skip", description="Samples whose mask keeps no token: skip them (counted in the summary and manifest, as "
        "`sstoken train` and TRL leave them out), or keep them with every label -100.", run_key=False,
    )
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or an export of other inputs or settings "
        "(files of other names are left as they are).", run_key=False,
    )
