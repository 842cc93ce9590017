"""Shared offline fixtures: a ChatML tokenizer and tiny random models saved as safetensors folders."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from pathlib import Path

import pytest

from tests import tiny


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
