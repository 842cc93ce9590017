"""Shared offline fixtures: a ChatML tokenizer, tiny random models saved as safetensors folders, one session
Ray, and one really scored corpus (`scored_corpus`) that the select, validate and score tests share.

Tests run the stages with `ray: {runner: process}` (the models in this process) unless Ray itself is what they
test: an actor's or Ray Train's start-up is a new process importing torch (seconds each), and both runners
write the same shards and end with the same tensors (tests/pipeline/scoring/test_score_in_process.py; the slow
tests/pipeline/loop/test_run_recovery.py, whose runs through Ray equal the same run in process).
"""

from __future__ import annotations

import gc
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests import tiny


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what collection built (torch, transformers, Ray, every test module) out of the garbage collector's
    reach: each full collection then skips those ~400k objects (0.4 s each on a small machine, and the score
    and train stages collect after every model they free). Objects made later are collected as ever."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny.save_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _model_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path, family: str, seed: int) -> Path:
    """A model folder that also holds the tokenizer, as real checkpoints do."""
    path = tmp_path_factory.mktemp(f"{family}-{seed}")
    tiny.save_tokenizer(path)
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return tiny.save_model(path, family, vocab_size, seed)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _model_dir(tmp_path_factory, tokenizer_dir, "llama", seed=0)


@pytest.fixture(scope="session")
def llama_history_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """Same architecture as `llama_dir`, other weights: a stand-in history checkpoint."""
    return _model_dir(tmp_path_factory, tokenizer_dir, "llama", seed=1)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _model_dir(tmp_path_factory, tokenizer_dir, "qwen2", seed=0)


@pytest.fixture(scope="session")
def qwen2_history_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return _model_dir(tmp_path_factory, tokenizer_dir, "qwen2", seed=1)


@pytest.fixture(scope="session")
def ray_local():
    """One small local Ray for the whole test session (2 CPUs, 256 MiB object store, loopback only).

    Stages reuse an already initialised Ray instead of starting their own, so tests that run Ray
    jobs in-process share this one and pay its start-up once.
    """
    import logging

    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",  # never join a cluster another process started with `ray start`
            num_cpus=2,
            object_store_memory=256 * 1024**2,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
    yield ray
    ray.shutdown()


# -- one really scored corpus for the whole session ----------------------------------------------

@dataclass(frozen=True)
class ScoredCorpus:
    """A tokenized corpus (`data`) scored into `scores` by `sstoken score` with its defaults (sstoken, gamma 0.5,
    ratio 0.6, per sample): current `llama_dir`, history `llama_history_dir`, every signal stored, the history
    NLLs in `cache`. Read-only: copy before changing anything (`copy_scores`); the session checks it is untouched."""

    data: Path
    scores: Path
    cache: Path
    config: Any  # the ScoreJobConfig that made `scores`
    summary: Any  # its StageSummary (a first run: every shard scored, every history NLL computed)

    def copy_scores(self, target: Path, cache: bool = False) -> Path:
        """A copy of the scores folder at `target` (its manifest still names the shared tokenized data); with
        `cache`, of the history cache too, at `<target>-cache`."""
        shutil.copytree(self.scores, target)
        if cache:
            shutil.copytree(self.cache, target.parent / f"{target.name}-cache")
        return Path(target)


def _snapshot(*folders: Path) -> dict[str, str]:
    from pipeline.runtime.fingerprint import sha256_file

    return {str(p): sha256_file(p) for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def scored_corpus(ray_local, tmp_path_factory, tokenizer, llama_dir, llama_history_dir):
    from pipeline.scoring.score_stage import ScoreJobConfig, run_score_job
    from tests.factories import SCORED_SHARDS, write_tokenized

    root = tmp_path_factory.mktemp("scored-corpus")
    data = write_tokenized(root / "tokenized", tokenizer, SCORED_SHARDS, seed=3)
    config = ScoreJobConfig(data=data, current=llama_dir, history=llama_history_dir, output=root / "scores",
                            history_cache=root / "cache", progress=False, ray={"runner": "process"})
    corpus = ScoredCorpus(data, config.output, config.history_cache, config, run_score_job(config))
    before = _snapshot(data, corpus.scores, corpus.cache)
    yield corpus
    assert _snapshot(data, corpus.scores, corpus.cache) == before, (
        "a test changed the shared scored corpus; copy it first (copy_scores)"
    )
