"""The train stage's one-worker runner without Ray Train: `run_rank` in this process, checkpoints kept here.

    fit_in_process(job, work)   # job.work == work; resumes from work/process/step-NNNNNNNN when one is there

Ray Train costs 25-45 s of start-up per run on a small machine (controller, worker group, a process
that imports torch again), more than a short round trains. With one CPU worker nothing needs a
cluster, so this runner calls the same `run_rank` directly. Its report callback keeps the
resumable state Ray Train would keep: each reported checkpoint is copied under a temporary name
and renamed into place when complete, the last two are kept, and a rerun resumes from the newest.
Since `run_rank` is deterministic from any checkpoint, both runners end with the same tensors.
"""

from __future__ import annotations

import gc
import shutil
from pathlib import Path
from typing import Any

import torch

from pipeline.training.train_worker import RankJob, run_rank

STATE = "process"
KEEP = 2
_PREFIX = "step-"
_PARTIAL = ".partial"


def saved_states(work: Path) -> list[Path]:
    """The complete checkpoints under WORK/process, oldest first (a half-copied one has the .partial suffix)."""
    folder = Path(work) / STATE
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and not p.name.endswith(_PARTIAL))


def _keep(work: Path, metrics: dict[str, Any], state: Path | None) -> None:
    """Ray Train's `report` for one local worker: the state copied into place, the older ones beyond KEEP removed."""
    if state is None:
        return
    folder = Path(work) / STATE
    target = folder / f"{_PREFIX}{int(metrics['step']):08d}"
    partial = target.with_name(target.name + _PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(state, partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    for old in saved_states(work)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)


def fit_in_process(job: RankJob, work: Path) -> None:
    """Train rank 0 of 1 here, from the newest kept state or the start, to the plan's last step."""
    (Path(work) / STATE).mkdir(parents=True, exist_ok=True)
    states = saved_states(work)
    device = torch.device("cuda") if job.use_gpu else torch.device("cpu")
    threads = torch.get_num_threads()
    try:
        run_rank(job, 0, 1, states[-1] if states else None, lambda m, s: _keep(work, m, s), device)
    finally:
        torch.set_num_threads(threads)  # run_rank sets the worker's count; the caller keeps its own
        gc.collect()
