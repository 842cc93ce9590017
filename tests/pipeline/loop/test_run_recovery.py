"""Slow: `sstoken run` killed with SIGKILL at random moments in round 2 and rerun, and a run on a two-node
loopback cluster with 2 training workers. Both end with the artifacts of an uninterrupted run.

The uninterrupted run scores and trains in this process (runner process), the others through Ray actors and
Ray Train: the kill test's exact equality is also the check that the runners end with the same shards and
tensors over two rounds (test_score_in_process shows it for one scoring in the fast suite).

Processes are ended by their ids (process groups and recorded descendants), never by name.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.loop.rounds import run_loop
from pipeline.loop.run_config import RunConfig
from pipeline.runtime.files import read_manifest
from pipeline.runtime.fingerprint import sha256_file
from pipeline.selection.compare import mask_agreement
from tests.pipeline.loop.test_rounds import run_settings, write_corpus
from tests.pipeline.scoring.test_score_recovery import (
    RAY_BIN, ROOT, _environment, _free_port, _kill_tree, _wait_for, count_alive_nodes,
)

# A two-round run takes 3-5 minutes on 2 busy cores; the kill test runs five of them.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]


def _config_file(folder: Path, output: Path, corpus: Path, model: Path) -> Path:
    path = folder / f"{output.name}.yaml"
    path.write_text(json.dumps(run_settings(output, corpus, model), default=str))  # JSON is YAML
    return path


def _start(config: Path, *flags: str, environment: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(config), *flags], cwd=ROOT, env=environment or _environment(),
        start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _finish(process: subprocess.Popen, timeout: float = 900) -> str:
    try:
        log, _ = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            _kill_tree(process)
    assert process.returncode == 0, log
    return log


def _artifacts(run: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """sha256 of every round's data, scores and masks shards; the final checkpoint's tensors."""
    digests = {}
    for round_dir in sorted((run / "rounds").iterdir()):
        for part in ("data", "scores", "masks"):
            for entry in read_manifest(round_dir / part)["shards"]:
                digests[f"{round_dir.name}/{part}/{entry['file']}"] = sha256_file(round_dir / part / entry["file"])
    return digests, load_file(run / "rounds" / "r001" / "train" / "checkpoint" / "model.safetensors")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, llama_dir) -> tuple[Path, Path]:
    """An uninterrupted run (and the corpus it ran on), scored and trained in this process (runner process; the
    stages' Ray tasks on an embedded Ray the run stops when done, so no Ray of ours runs beside the cluster
    test): seconds, where a run through Ray actors and Ray Train takes minutes."""
    folder = tmp_path_factory.mktemp("reference")
    corpus = write_corpus(folder / "corpus.jsonl", 16)
    settings = run_settings(folder / "run", corpus, llama_dir)
    settings["ray"] = {"runner": "process"}
    assert run_loop(RunConfig(**settings)).record.status == "done"
    return folder / "run", corpus


def test_killed_at_random_moments_in_round_two_then_rerun_equals_an_uninterrupted_run(reference, llama_dir, tmp_path):
    expected_run, corpus = reference
    output = tmp_path / "run"
    config = _config_file(tmp_path, output, corpus, llama_dir)
    second = output / "rounds" / "r001"
    rng = random.Random(20261128)
    # Kill moments in round 2: while scoring, while selecting or training (after the masks), mid-training.
    moments = [
        lambda: (second / "scores" / "_progress").is_dir(),
        lambda: (second / "masks" / "manifest.json").is_file(),
        lambda: (second / "train" / "metrics.jsonl").is_file(),
    ]
    kills = 0
    for ready in moments:
        process = _start(config)
        delay = rng.uniform(0.0, 3.0)
        seen = None
        while process.poll() is None:
            if seen is None and ready():
                seen = time.monotonic()
            if seen is not None and time.monotonic() - seen >= delay:
                _kill_tree(process)
                kills += 1
                break
            time.sleep(0.05)
        if process.poll() is None:
            _kill_tree(process)
    assert kills >= 2, f"most runs finished before their kill moment ({kills} kills)"
    log = _finish(_start(config))
    assert "r000: done earlier" in log
    digests, tensors = _artifacts(output)
    expected_digests, expected_tensors = _artifacts(expected_run)
    assert digests == expected_digests
    assert tensors.keys() == expected_tensors.keys()
    assert all(torch.equal(tensors[name], expected_tensors[name]) for name in tensors)
    record = json.loads((output / "run.json").read_text())
    assert record["status"] == "done" and [r["status"] for r in record["rounds"]] == ["done", "done"]
    assert record["config"]["ray"]["runner"] == "ray"  # the killed runs and the rerun: Ray actors and Ray Train
    # Ray Train leaves the train stage's output as the process runner does (the layout test_train checks), with
    # the same counts (steps, kept tokens, tokens, final loss).
    for name in ("r000", "r001"):
        trains = [run / "rounds" / name / "train" for run in (output, expected_run)]
        listing = [sorted(p.name for p in train.iterdir()) for train in trains]
        assert listing[0] == listing[1] == [".lock", "_progress", "checkpoint", "manifest.json", "metrics.jsonl"]
        assert read_manifest(trains[0], kind="train")["counts"] == read_manifest(trains[1], kind="train")["counts"]


def test_two_node_loopback_cluster_with_two_training_workers(reference, llama_dir, tmp_path):
    expected_run, corpus = reference
    port = _free_port()
    environment = {k: v for k, v in _environment().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats", "--block"]
    started: list[subprocess.Popen] = []

    def ray_start(*arguments: str) -> None:
        started.append(subprocess.Popen(
            [str(RAY_BIN), "start", *arguments, *common], env=environment, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        ))

    def alive_nodes() -> int:
        return count_alive_nodes(port, environment)

    output = tmp_path / "run"
    address = f"127.0.0.1:{port}"
    try:
        ray_start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false")
        _wait_for(lambda: alive_nodes() == 1, 90, "the head node")
        ray_start(f"--address={address}", "--node-ip-address=127.0.0.1")
        _wait_for(lambda: alive_nodes() == 2, 90, "the worker node")
        config = _config_file(tmp_path, output, corpus, llama_dir)
        _finish(_start(config, "--ray.address", address, "--train.workers", "2", environment=environment))
    finally:
        for process in started:
            _kill_tree(process)
    digests, tensors = _artifacts(output)
    expected_digests, expected_tensors = _artifacts(expected_run)
    # Round 0 is scored by the base on either cluster: the same bytes. Two workers with the same global
    # batch give the same gradients within float tolerance; AdamW moves a weight by up to about lr per
    # step whatever the gradient's size, so where a gradient is near 0 its summation order can flip the
    # step: weights agree within 2 x lr x steps (4 steps, lr 1e-4), and round 1's masks nearly agree.
    first = {name: digest for name, digest in digests.items() if name.startswith("r000/")}
    assert first == {name: digest for name, digest in expected_digests.items() if name.startswith("r000/")}
    assert all(torch.allclose(tensors[name], expected_tensors[name], rtol=0, atol=8e-4) for name in tensors)
    agreement = mask_agreement(output / "rounds" / "r001" / "masks", expected_run / "rounds" / "r001" / "masks")
    assert agreement["samples"] == 8 and agreement["same_decision"] > 0.9
    record = json.loads((output / "run.json").read_text())
    assert record["config"]["train"]["workers"] == 2 and record["status"] == "done"
