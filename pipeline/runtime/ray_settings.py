"""`RaySettings`: where a stage's work runs, one block shared by every stage config.

`sstoken score` and `sstoken train` take it as their `ray:` section (`--ray.address`, `ray:` in
YAML); a run config (`sstoken run`, `demo`, the cells of `eval`) has one `ray:` section that every
stage of the run uses, since the run opens one Ray session for all of them. None of these settings
changes what a stage computes, so none is part of a run key.

Torch-free and Ray-free: `--help` and every config import it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from pipeline.runtime.config import StageConfig, setting

# How long joining a cluster waits for it to answer by default (a cluster still starting gets that long).
DEFAULT_CONNECT_TIMEOUT_S = 30.0


class RaySettings(StageConfig):
    """The Ray cluster a stage joins (or the embedded one it starts), and whether its models run under Ray at all."""

    address: str | None = Field(
        None, description="Ray cluster to run on (HOST:PORT, auto, ray://...); default: RAY_ADDRESS, else an embedded "
        "local Ray.",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded Ray; default: this machine's.")
    object_store_mb: int | None = Field(
        None, ge=100, description="Object store of the embedded Ray in MiB; default: a tenth of memory, within 256-2048.",
    )
    connect_timeout_s: float = Field(
        DEFAULT_CONNECT_TIMEOUT_S, gt=0, description="Seconds to wait for the Ray cluster at address to answer before "
        "giving up.",
    )
    runner: Literal["ray", "process"] = Field(
        "ray", description="ray: the models run in Ray actors and the trainer under Ray Train (a cluster, several "
        "workers, GPUs); process: the score stage's models one at a time in this process and the trainer as one "
        "worker in this process, without their start-up (the times: README, `sstoken train`). The same results "
        "either way.",
    )

    @property
    def object_store_bytes(self) -> int | None:
        """The embedded Ray's object store in bytes (None: the default size)."""
        return self.object_store_mb * 1024**2 if self.object_store_mb else None


def ray_section() -> Any:
    """A stage config's `ray:` section (`ray: RaySettings = ray_section()`): out of the run key, defaults unless set."""
    return setting(
        default_factory=RaySettings, description="The Ray cluster to join (or the embedded one to start) and the runner.",
        run_key=False,
    )
