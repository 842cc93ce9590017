"""The score job's actor pool: actors started once and reused across phases, one model at a time, none left over."""

from __future__ import annotations

import gc
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.scoring import scorer as scorer_module
from pipeline.scoring.actor_pool import ActorPool
from pipeline.scoring.score_config import ScoreJobConfig
from pipeline.scoring.score_stage import run_score_job
from tests.factories import write_tokenized


class _Silent:
    def shard_done(self, tokens: int) -> None:
        pass


@dataclass(frozen=True)
class _Task:
    file: str


class _ModelFreeActor:
    """ShardScoringActor's interface without a model: what the pool does with actors, in a second."""

    def __init__(self, settings, selection):
        import uuid

        self.id = uuid.uuid4().hex[:8]
        self.loads: list[str] = []

    def load(self, checkpoint: str, phase: str, history_fingerprint: str | None = None) -> str:
        self.loads.append(phase)
        return "cpu/float32"

    def run(self, task: _Task) -> dict:
        return {"file": task.file, "tokens": 1, "actor": self.id, "loads": list(self.loads)}

    def phases_loaded(self) -> list[str]:
        return self.loads


def _config(tmp_path: Path, runner: str, current: Path | str = "current", history: Path | str = "history") -> ScoreJobConfig:
    return ScoreJobConfig(data=tmp_path, current=current, history=history, output=tmp_path / "out", progress=False,
                          ray={"runner": runner})


def test_the_score_phase_reuses_the_history_actors_starts_the_missing_and_kills_the_surplus(ray_local, tmp_path):
    import ray

    pool = ActorPool(_config(tmp_path, "ray"), workers=2, cpus=1)
    pool.actor_class = ray.remote(_ModelFreeActor).options(num_cpus=1, max_restarts=0)
    with pool:
        results, started = pool.run_phase("history", [_Task("a")], _Silent())
        assert started == 1 and [r["loads"] for r in results] == [["history"]]
        (history_actor,) = pool.actors
        # Three shards, two workers: the history actor stays (its second load), one more starts. (The model-free
        # actors are so quick that the first may take every shard before the second is up: the pool keeps both.)
        results, started = pool.run_phase("score", [_Task(f) for f in "abc"], _Silent(), "fingerprint")
        assert started == 1 and sorted(r["file"] for r in results) == ["a", "b", "c"] and len(pool.actors) == 2
        assert history_actor in pool.actors and ray.get(history_actor.phases_loaded.remote()) == ["history", "score"]
        # One shard: one actor kept, the other killed (it would hold a model for nothing).
        before = list(pool.actors)
        results, started = pool.run_phase("score", [_Task("d")], _Silent())
        assert started == 0 and len(pool.actors) == 1
        (surplus,) = [actor for actor in before if actor not in pool.actors]
        assert _killed(surplus)
        kept = pool.actors[0]
    assert pool.actors == [] and _killed(kept)  # closing the pool killed the rest


def _killed(actor, within_s: float = 30.0) -> bool:
    """Whether the actor's calls fail as a dead actor's do. `ray.kill` is asynchronous: a call made just after it may
    still run, so a live answer is asked again until the deadline."""
    import ray
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.phases_loaded.remote(), timeout=within_s)
        except RayActorError:
            return True
        time.sleep(0.1)
    return False


def test_the_process_runner_holds_one_model_at_a_time_across_phases(ray_local, tokenizer, llama_dir, llama_history_dir,
                                                                   tmp_path):
    """One object for both phases; the history model is gone (not merely unreferenced by the pool: collected) before
    the current one loads, and the last is freed when the job ends."""
    built: list[weakref.ref] = []
    construct = scorer_module.Scorer.__init__

    def recording(self, *args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in built), "a model was loaded while another was held"
        construct(self, *args, **kwargs)
        built.extend([weakref.ref(self), weakref.ref(self.model)])  # the model too: nothing else may hold it

    data = write_tokenized(tmp_path / "tokenized", tokenizer, [2, 1], seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scorer_module.Scorer, "__init__", recording)
        summary = run_score_job(ScoreJobConfig(
            data=data, current=llama_dir, history=llama_history_dir, output=tmp_path / "scores",
            history_cache=tmp_path / "cache", progress=False, ray={"runner": "process"},
        ))
    phases = summary.details["phases"]
    assert (phases["history"]["shards"], phases["score"]["shards"]) == (2, 2)
    assert (phases["history"]["actors_started"], phases["score"]["actors_started"]) == (1, 0)
    assert len(built) == 4  # two scorers, two models
    gc.collect()
    assert all(ref() is None for ref in built)
