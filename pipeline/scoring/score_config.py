"""The score stage's config: what `sstoken score` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.runtime.config import setting
from pipeline.runtime.ray_settings import RaySettings, ray_section
from pipeline.scoring.score_settings import ScoreSettings
from pipeline.selection.select_settings import SelectSettings


class ScoreJobConfig(ScoreSettings, SelectSettings):
    """`sstoken score`: the scoring and selection settings plus where data, models and output live; `ray:` where it runs.

    None of these fields is part of the run key: the data and checkpoints enter it by fingerprint,
    the rest say where and how the job runs (a new granularity only re-selects).
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    current: Path = setting(description="Current checkpoint folder (safetensors + tokenizer).", run_key=False)
    history: Path | None = setting(
        None, description="History checkpoint folder; default: the current one (REL is 0, attention only).", run_key=False
    )
    output: Path = setting(description="Output folder for score shards and manifest.json.", run_key=False)
    history_cache: Path | None = setting(
        None, description="History NLL cache root; default: $SSTOKEN_CACHE/history or ~/.cache/sstoken/history.",
        run_key=False,
    )
    cache_current_nll: bool = setting(
        False, description="Also store the current checkpoint's NLLs in the history cache, so a later run that takes "
        "this checkpoint as its history model over the same data skips its history pass (`sstoken run` turns it on).",
        run_key=False,
    )
    workers: int | None = setting(
        None, ge=1, description="Scoring actors; default: as many as the cluster's CPUs (or GPUs) hold.", run_key=False
    )
    cpus_per_worker: float | None = setting(
        None, gt=0, description="CPUs reserved by each actor (its torch threads); default: up to 4, one node's worth.",
        run_key=False,
    )
    gpus_per_worker: float = setting(0.0, ge=0, description="GPUs per actor; 0 = score on CPU.", run_key=False)
    progress: bool = setting(True, description="Show a progress bar while scoring.", run_key=False)
    ray: RaySettings = ray_section()
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or scores of another corpus, "
        "checkpoints or settings (files of other names are left as they are).", run_key=False,
    )

    def score_settings(self) -> ScoreSettings:
        return ScoreSettings(**{name: getattr(self, name) for name in ScoreSettings.model_fields})

    def select_settings(self) -> SelectSettings:
        return SelectSettings(**{name: getattr(self, name) for name in SelectSettings.model_fields})
