"""The train stage's config: what `sstoken train` takes, one pydantic model.

It lives apart from the stage's code so that building the CLI, `--help` and a run config's
sections imports pydantic only, never torch or pyarrow. Each field says whether it is part of the
stage's run key (`setting(..., run_key=False)`: it changes where or how the work runs, not what a
finished shard holds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import model_validator

from pipeline.runtime.config import setting
from pipeline.runtime.ray_settings import RaySettings, ray_section
from pipeline.training.online_settings import OnlineSettings
from pipeline.training.train_settings import TrainSettings


class TrainConfig(TrainSettings):
    """`sstoken train`: the SFT settings plus where tokens, masks, the starting model and the output live; `ray:` where it runs.

    None of these fields is part of the run key: data, masks and model enter it by fingerprint, the
    rest say where and how the run goes (another number of workers resumes the same run).
    """

    data: Path = setting(description="Tokenized input folder (made by `sstoken prepare`).", run_key=False)
    selection: Literal["masks", "online"] = setting(
        "masks", run_key=False,
        description="masks: train on the keep masks of --masks, selected offline; online: each step selects its own "
        "tokens from its forward (`online:` section: the select stage's methods, the history NLLs from the score "
        "stage's cache) and writes them as mask shards to DIR/masks/.",
    )
    masks: Path | None = setting(
        None, description="Keep masks (selection masks): a scores folder (`sstoken score` / `sstoken select`) or a "
        "masks folder (`sstoken select --output`) made from --data.", run_key=False,
    )
    online: OnlineSettings = setting(
        default_factory=OnlineSettings, run_key=False,
        description="selection online: the method and its settings, the history checkpoint and cache, the warm-up.",
    )
    model: Path = setting(description="Starting checkpoint: a Hugging Face folder (safetensors + tokenizer).", run_key=False)
    output: Path = setting(
        description="Output folder: checkpoint/ (the trained model), metrics.jsonl, train/ (resumable state while "
        "running) and manifest.json.", run_key=False,
    )
    workers: int = setting(1, ge=1, description="Training workers (data-parallel ranks).", run_key=False)
    use_gpu: bool = setting(False, description="One GPU per worker (bf16 autocast with dtype auto).", run_key=False)
    cpus_per_worker: float | None = setting(
        None, gt=0, description="CPUs per worker (its torch threads); default: the cluster's CPUs shared by the workers, "
        "at most one node's.", run_key=False,
    )
    trust_remote_code: bool = setting(
        False, description="Allow model code shipped inside the model folder to run.", run_key=False
    )
    progress: bool = setting(True, description="Show a progress bar while training.", run_key=False)
    ray: RaySettings = ray_section()
    overwrite: bool = setting(
        False, description="Write into an output folder holding other files or a model trained from other inputs or "
        "settings (files of other names are left as they are).", run_key=False,
    )

    @model_validator(mode="after")
    def _selection_has_its_inputs(self) -> TrainConfig:
        if self.selection == "masks" and self.masks is None:
            raise ValueError("selection masks trains on keep masks: pass masks (a scores or masks folder), or set "
                             "selection online")
        if self.selection == "online":
            if self.masks is not None:
                raise ValueError("selection online selects its own tokens and writes them to OUTPUT/masks; pass no masks")
            if self.workers != 1:
                raise ValueError("selection online trains one worker for now (its mask shards are written by that "
                                 "worker); set workers 1")
            if self.epochs > 1:
                raise ValueError(f"selection online makes one pass at most (epochs <= 1, got {self.epochs:g}): each "
                                 "sample's mask is selected once and stored once")
        return self

    @model_validator(mode="after")
    def _process_runner_is_one_local_worker(self) -> TrainConfig:
        if self.ray.runner == "process" and (self.workers != 1 or self.ray.address is not None):
            raise ValueError(
                "ray.runner process trains one worker in this process; set workers 1 and no ray.address, or ray.runner ray"
            )
        return self
