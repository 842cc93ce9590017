"""The score job's workers: actors that hold one model at a time, kept from the history phase to the score phase.

    with ActorPool(config, workers, cpus) as pool:
        history_results = pool.run_phase("history", history_tasks, progress)
        score_results = pool.run_phase("score", tasks, progress, history_fingerprint)

An actor process costs seconds before its first forward (spawning it, importing torch and
transformers, about 5 s on a 2-core machine), more than loading a 135M model (under 1 s). So the
actors of the history phase stay for the score phase: each drops its history model, then loads the
current one (`ShardScoringActor.load`), and never holds two. A phase with more shards than the
pool has actors starts the missing ones; an actor that dies is replaced and its shard handed out
again. The pool is closed (every actor killed) before the select step, whose tasks need the CPUs
the actors hold. `ray.runner: process` runs the same class in this process, one object, the
phases in turn.
"""

from __future__ import annotations

import gc
import uuid
from collections import deque
from types import TracebackType
from typing import Any, Literal

from pipeline.runtime.errors import UserError
from pipeline.runtime.ray_session import machine_cpus, task_error_cause
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.scoring.score_settings import ScoreSettings, signals_to_compute
from pipeline.scoring.score_shards import ShardTask, fill_history_cache, score_one_shard
from pipeline.selection.select_settings import SelectSettings

# How often one shard may lose its actor (node loss, OOM kill) before the job gives up.
MAX_SHARD_ATTEMPTS = 4

Phase = Literal["history", "score"]


class ShardScoringActor:
    """A Ray actor (or, for the process runner, a plain object) holding at most ONE model at a time.

    load("history"): the history checkpoint, filling the history cache (NLLs only).
    load("score"): the current checkpoint, scoring shards with the cached history NLLs.
    """

    def __init__(self, settings: ScoreSettings, selection: SelectSettings):
        self.settings = settings
        self.selection = selection
        self.id = uuid.uuid4().hex[:12]
        self.phase: Phase | None = None
        self.history_fingerprint: str | None = None
        self.scorer: Any = None

    def load(self, checkpoint: str, phase: Phase, history_fingerprint: str | None = None) -> str:
        """Drop the model held (if any), then load this phase's; returns "device/dtype". A model that cannot be
        loaded raises here, as an ordinary task error the driver reports as it is."""
        from transformers.utils import logging as transformers_logging

        from pipeline.scoring.scorer import Scorer

        transformers_logging.disable_progress_bar()  # "Loading weights" bars would reach the job's log
        self.release()  # the old model's memory goes before the new one comes
        # Attention and entropy come from the current pass only; the history pass gives NLLs alone.
        wanted = signals_to_compute(self.settings.signals, self.selection)
        current = phase == "score"
        self.scorer = Scorer(checkpoint, self.settings, importance=current and wanted.attention,
                             entropy=current and wanted.entropy)
        self.phase, self.history_fingerprint = phase, history_fingerprint
        return f"{self.scorer.device.type}/{self.scorer.dtype_name}"

    def run(self, task: ShardTask) -> dict[str, Any]:
        """This phase's work on one shard, plus the model loads and forwards it took (for the summary)."""
        before = self.scorer.forward_count
        if self.phase == "history":
            result = fill_history_cache(self.scorer, task)
        else:
            result = score_one_shard(self.scorer, task, self.selection, self.history_fingerprint)
        forwards = self.scorer.forward_count - before
        return result | {"actor": self.id, "model_loads": self.scorer.model_loads, "forwards": forwards}

    def release(self) -> None:
        """Drop the model held and collect it (its memory is free once this returns)."""
        self.scorer = None
        gc.collect()


class ActorPool:
    """Up to `workers` actors of `cpus` CPUs each, started as a phase needs them and reused by the next phase."""

    def __init__(self, config: ScoreJobConfig, workers: int, cpus: float):
        self.config = config
        self.workers = workers
        self.selection = config.select_settings()
        self.in_process = config.ray.runner == "process"
        threads = config.threads or (machine_cpus() if self.in_process else max(1, int(cpus)))
        self.settings = config.score_settings().model_copy(update={"threads": threads})
        self.actors: list[Any] = []  # idle between phases, each holding the last phase's model
        self.actor_class: Any = None
        if not self.in_process:
            import ray

            self.actor_class = ray.remote(ShardScoringActor).options(
                num_cpus=cpus, num_gpus=config.gpus_per_worker, max_restarts=0, max_task_retries=0
            )

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Kill every actor (or free the in-process model): nothing of the pool holds CPUs or memory after."""
        actors, self.actors = self.actors, []
        if self.in_process:
            for actor in actors:
                actor.release()
            return
        import ray

        for actor in actors:
            ray.kill(actor)

    def run_phase(
        self, phase: Phase, tasks: list[ShardTask], progress: Any, history_fingerprint: str | None = None
    ) -> tuple[list[dict[str, Any]], int]:
        """This phase's work on every shard: (each shard's result, actors started for it)."""
        if not tasks:
            return [], 0
        checkpoint = str(self.config.history if phase == "history" else self.config.current)
        if self.in_process:
            return self._run_here(phase, checkpoint, tasks, progress, history_fingerprint)
        return self._run_on_ray(phase, checkpoint, tasks, progress, history_fingerprint)

    def _run_here(
        self, phase: Phase, checkpoint: str, tasks: list[ShardTask], progress: Any, history_fingerprint: str | None
    ) -> tuple[list[dict[str, Any]], int]:
        started = 0
        if not self.actors:  # one object for every phase
            self.actors, started = [ShardScoringActor(self.settings, self.selection)], 1
        actor = self.actors[0]
        actor.load(checkpoint, phase, history_fingerprint)
        results: list[dict[str, Any]] = []
        for task in tasks:
            results.append(actor.run(task))
            progress.shard_done(results[-1]["tokens"])
        return results, started

    def _run_on_ray(
        self, phase: Phase, checkpoint: str, tasks: list[ShardTask], progress: Any, history_fingerprint: str | None
    ) -> tuple[list[dict[str, Any]], int]:
        """Hand shards to the actors; replace actors that die and redo their shards. On an exception the actors stay
        in the pool for `close` (the caller's `with`) to kill."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        wanted = min(self.workers, len(tasks))
        for actor in self.actors[wanted:]:  # more actors than shards: the surplus would hold a model for nothing
            ray.kill(actor)
        # Every live actor of the pool, kept here as it changes, so that `close` finds them all whatever happens.
        self.actors = alive = self.actors[:wanted]
        starts = 0

        def load(actor: Any) -> tuple[Any, Any]:
            return actor.load.remote(checkpoint, phase, history_fingerprint), actor

        def start_actor() -> tuple[Any, Any]:
            nonlocal starts
            starts += 1
            alive.append(self.actor_class.remote(self.settings, self.selection))
            return load(alive[-1])

        def forget(actor: Any) -> None:
            alive[:] = [a for a in alive if a is not actor]

        queue = deque(tasks)
        attempts: dict[str, int] = {}
        loading = dict(load(actor) for actor in list(alive))
        loading.update(start_actor() for _ in range(wanted - len(alive)))
        running: dict[Any, tuple[Any, ShardTask]] = {}
        idle: list[Any] = []
        results: list[dict[str, Any]] = []
        actor_failures = 0
        while queue or running:
            while idle and queue:
                actor, task = idle.pop(), queue.popleft()
                running[actor.run.remote(task)] = (actor, task)
            done, _ = ray.wait([*loading, *running], num_returns=1)
            ref = done[0]
            if ref in loading:
                actor = loading.pop(ref)
                try:
                    ray.get(ref)
                    idle.append(actor)
                except RayTaskError as error:  # the model could not be loaded: no point retrying
                    raise task_error_cause(error) from None
                except RayActorError as error:
                    forget(actor)
                    actor_failures += 1
                    if actor_failures > self.workers + MAX_SHARD_ATTEMPTS:
                        raise UserError(f"scoring actors keep failing to start: {error}") from error
                    loading.update([start_actor()])
                continue
            actor, task = running.pop(ref)
            try:
                result = ray.get(ref)
            except RayActorError as error:  # the actor's process or node died: redo the shard elsewhere
                attempts[task.file] = attempts.get(task.file, 0) + 1
                if attempts[task.file] >= MAX_SHARD_ATTEMPTS:
                    raise UserError(f"shard {task.file} lost its actor {attempts[task.file]} times: {error}") from error
                queue.appendleft(task)
                ray.kill(actor)
                forget(actor)
                loading.update([start_actor()])
                continue
            except RayTaskError as error:
                raise task_error_cause(error) from None
            results.append(result)
            idle.append(actor)
            progress.shard_done(result["tokens"])
        return results, starts
