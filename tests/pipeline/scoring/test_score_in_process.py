"""`ray.runner: process`: the score stage's models in this process, the same shards as its Ray actors write."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.runtime.files import read_manifest
from pipeline.scoring import scorer as scorer_module
from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job
from tests.factories import write_tokenized


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, [4, 3], seed=5)


def _score(corpus: Path, output: Path, current: Path, history: Path, runner: str):
    return run_score_job(ScoreJobConfig(
        data=corpus, current=current, history=history, output=output, history_cache=output.parent / f"{output.name}-cache",
        progress=False, workers=1, ray={"runner": runner},
    ))


def _flat(values: list) -> list:
    """A column's values with NaN spelled as a string, so that equal columns compare equal."""
    flat = [v for row in values for v in row] if values and isinstance(values[0], list) else list(values)
    return ["nan" if isinstance(v, float) and math.isnan(v) else v for v in flat]


def test_the_process_runner_writes_the_shards_the_actors_write(ray_local, corpus, llama_dir, llama_history_dir, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded in the driver")

    with pytest.MonkeyPatch.context() as patch:  # runner ray: the models load in the actors only, never here
        patch.setattr(scorer_module.Scorer, "__init__", refuse)
        actors = _score(corpus, tmp_path / "ray", llama_dir, llama_history_dir, "ray")
    # The actor pool (the fast suite's one full run of it; the other score tests run the models in process):
    # phase 1 fills the history cache with only the history model loaded, phase 2 scores with only the current
    # model, each actor loads its model once (not once per shard), and the history phase's actor stays to score
    # (it drops the history model, then loads the current one: no second actor start).
    for phase in ("history", "score"):
        pool = actors.details["phases"][phase]
        assert pool["shards"] == 2 and pool["model_loads"] == pool["actors"] == 1 and pool["forwards"] >= 2, (phase, pool)
    assert actors.details["phases"]["history"]["actors_started"] == 1
    assert actors.details["phases"]["score"]["actors_started"] == 0
    assert (actors.counts["history_computed"], actors.counts["history_reused"]) == (2, 0)
    local = _score(corpus, tmp_path / "process", llama_dir, llama_history_dir, "process")
    assert local.counts == actors.counts and local.counts["history_computed"] == 2  # shards
    assert local.details["phases"]["history"]["shards"] == 2 and local.details["phases"]["score"]["shards"] == 2
    # Bit for bit: signals, score, keep of every shard (NaN off the targets on both sides).
    for shard in read_manifest(tmp_path / "ray", kind="scores")["shards"]:
        ray, local = (pq.read_table(tmp_path / side / shard["file"]) for side in ("ray", "process"))
        assert ray.schema == local.schema
        for column in ray.column_names:
            assert _flat(ray.column(column).to_pylist()) == _flat(local.column(column).to_pylist()), column
    again = _score(corpus, tmp_path / "process", llama_dir, llama_history_dir, "process")
    assert again.counts["shards_scored"] == 0 and again.counts["shards_skipped"] == 2
