"""Slow: the score job killed with SIGKILL at random moments, and a Ray worker node lost mid-run.

Both end with artifacts byte-identical to an uninterrupted run, no sample missing or duplicated.
Processes are ended by their ids (process groups and recorded descendants), never by name.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.runtime.files import read_manifest, verify_shards
from pipeline.runtime.fingerprint import sha256_file
from pipeline.runtime.ray_session import machine_cpus
from tests.factories import write_tokenized

ROOT = Path(__file__).resolve().parents[3]
RAY_BIN = Path(sys.executable).parent / "ray"
pytestmark = pytest.mark.slow

# Fields that legitimately differ between runs of the same job (code_version: a commit may land
# in a shared checkout between two runs).
_RUN_SPECIFIC = ("created_at", "timings", "config", "history_cache", "inputs", "checkpoints", "code_version")


def _environment(**extra: str) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    environment.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", **extra)
    return environment


def _score_command(data: Path, current: Path, history: Path, output: Path, cache: Path) -> list[str]:
    return [
        "--data", str(data), "--current", str(current), "--history", str(history), "--output", str(output),
        "--history-cache", str(cache), "--granularity", "global", "--no-progress",
    ]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL a process started with start_new_session, its group and every descendant."""
    try:
        family = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in family:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=30)
    psutil.wait_procs(family, timeout=30)


def _artifacts(output: Path, data: Path) -> tuple[dict[str, str], dict]:
    """Shard digests and the manifest without run-specific fields; checks ids against the input."""
    manifest = read_manifest(output, kind="scores")
    verify_shards(output, manifest)
    for entry in manifest["shards"]:
        ids = pq.read_table(output / entry["file"], columns=["sample_id"]).column("sample_id").to_pylist()
        assert ids == pq.read_table(data / entry["file"], columns=["sample_id"]).column("sample_id").to_pylist()
        assert len(set(ids)) == len(ids)
    digests = {p.name: sha256_file(p) for p in sorted(output.glob("part-*.parquet"))}
    assert set(digests) == {s["file"] for s in manifest["shards"]}
    return digests, {k: v for k, v in manifest.items() if k not in _RUN_SPECIFIC}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tokenizer) -> Path:
    return write_tokenized(tmp_path_factory.mktemp("tokenized"), tokenizer, [6, 9, 4, 8, 7, 5, 9, 6], seed=11, scale=3)


def test_sigkill_at_random_moments_then_rerun_gives_identical_artifacts(corpus, llama_dir, llama_history_dir, tmp_path):
    def run(output: Path, cache: Path, kill_when=None) -> bool:
        """Run the CLI; SIGKILL it as soon as `kill_when()` holds. True when it was killed."""
        command = [sys.executable, "-m", "pipeline", "score", *_score_command(corpus, llama_dir, llama_history_dir, output, cache)]
        process = subprocess.Popen(
            command, cwd=ROOT, env=_environment(), start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while process.poll() is None and time.monotonic() < deadline:
                if kill_when is not None and kill_when():
                    _kill_tree(process)
                    return True
                time.sleep(0.02)
        finally:
            if process.poll() is None:
                _kill_tree(process)
        log = process.stdout.read()
        assert process.returncode == 0, log
        return False

    # The uninterrupted run, in this process (runner process, the same shards as the actors write; the stage's
    # Ray tasks on an embedded Ray it stops when done, so no Ray of ours runs beside the cluster tests): the
    # killed runs below, through Ray actors, must end with exactly its shards.
    reference_command = _score_command(corpus, llama_dir, llama_history_dir, tmp_path / "reference", tmp_path / "reference-cache")
    threads = str(min(4, machine_cpus()))  # an actor's: up to 4 CPUs of the one node
    assert main(["score", *reference_command, "--ray.runner", "process", "--threads", threads]) == 0
    reference = _artifacts(tmp_path / "reference", corpus)

    output, cache = tmp_path / "killed", tmp_path / "killed-cache"
    progress = output / "_progress"

    def after_writes(count: int, delay: float):
        """A kill moment: `delay` s after this run committed `count` shard writes (score or keep rewrite)."""
        since, seen_at = time.time(), []

        def due() -> bool:
            if not seen_at:
                written = [p for p in progress.glob("*.json") if p.stat().st_mtime >= since] if progress.exists() else []
                if len(written) >= count:
                    seen_at.append(time.monotonic())
                return False
            return time.monotonic() - seen_at[0] >= delay

        return due

    rng = random.Random(20261128)
    kill_at = time.monotonic() + rng.uniform(1.0, 6.0)
    kills = [run(output, cache, lambda: time.monotonic() > kill_at)]  # during start-up
    for _ in range(3):  # mid-scoring or mid-rewrite: a random number of commits, then a random instant
        kills.append(run(output, cache, after_writes(rng.randint(1, 6), rng.uniform(0.0, 0.3))))
    assert sum(kills) >= 3, f"most runs finished before their kill moment: {kills}"
    run(output, cache)
    assert _artifacts(output, corpus) == reference
    assert not list(output.glob(".*.tmp-*"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for(condition, timeout: float, what: str, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def count_alive_nodes(port: int, environment: dict[str, str]) -> int:
    """Alive nodes of the loopback cluster whose head listens on `port` (0 while it does not answer)."""
    result = subprocess.run(
        [sys.executable, "-c", "import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR');"
         "print(sum(n['Alive'] for n in ray.nodes()))" % port],
        env=environment, capture_output=True, text=True, timeout=60,
    )
    return int(result.stdout.strip().splitlines()[-1]) if result.returncode == 0 else 0


# One CPU per actor (one actor per node) and small micro-batches, so the tiny model takes long
# enough for the node to die mid-run. The reference run uses the same flags (batching is part of
# what the bytes depend on).
SLOW_SCORING = ["--cpus-per-worker", "1", "--max-batch-tokens", "160"]


def test_worker_node_killed_mid_run_loses_nothing(corpus, llama_dir, llama_history_dir, tmp_path):
    port = _free_port()
    # Multi-node needs Ray's cluster mode (the loopback switch refuses a second node); every node
    # binds 127.0.0.1 through --node-ip-address instead.
    environment = {k: v for k, v in _environment().items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    common = ["--num-cpus", "1", "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats", "--block"]
    started: list[subprocess.Popen] = []

    def ray_start(*arguments: str) -> subprocess.Popen:
        process = subprocess.Popen(
            [str(RAY_BIN), "start", *arguments, *common], env=environment, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        started.append(process)
        return process

    def alive_nodes() -> int:
        return count_alive_nodes(port, environment)

    output, cache = tmp_path / "scores", tmp_path / "cache"
    entrypoint = (
        [sys.executable, str(ROOT / "jobs" / "score.py"), *_score_command(corpus, llama_dir, llama_history_dir, output, cache),
         *SLOW_SCORING]
    )

    log = tmp_path / "driver.log"

    def driver() -> subprocess.Popen:
        """The job's entrypoint as a driver joining the cluster (RAY_ADDRESS), as `ray job submit` runs it on the
        head; started directly, so no job agent is waited for (on a busy machine the head's agent can take
        minutes to come up, and this test is about the node loss, not about job submission)."""
        with log.open("a") as sink:  # a file, not a pipe: nothing blocks the driver while the test waits
            return subprocess.Popen(
                entrypoint, cwd=ROOT, env=environment | {"RAY_ADDRESS": f"127.0.0.1:{port}"}, start_new_session=True,
                stdout=sink, stderr=subprocess.STDOUT,
            )

    try:
        ray_start("--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false")
        _wait_for(lambda: alive_nodes() == 1, 90, "the head node")
        worker = ray_start(f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1")
        _wait_for(lambda: alive_nodes() == 2, 90, "the worker node")

        first = driver()
        started.append(first)
        try:  # watch the files only (cheap and quick), so the node dies while shards are being scored
            _wait_for(lambda: any(output.glob("part-*.parquet")) or first.poll() is not None, 180, "the first shard",
                      interval=0.05)
        except AssertionError:
            _kill_tree(first)
            raise AssertionError(log.read_text()) from None
        assert first.poll() is None and not (output / "manifest.json").exists(), "the job ended before the node was killed"
        written_at_kill = len(list(output.glob("part-*.parquet")))
        _kill_tree(worker)  # the node and the actor it hosted vanish mid-run

        first.wait(timeout=300)
        first_run_succeeded = first.returncode == 0
        print(f"node killed with {written_at_kill} of 8 shards written; "
              f"the job {'completed on the surviving node' if first_run_succeeded else 'failed and was rerun'}")
        if not first_run_succeeded:  # allowed to fail; its rerun must complete
            rerun = driver()
            started.append(rerun)
            rerun.wait(timeout=300)
            assert rerun.returncode == 0, log.read_text()
    finally:
        for process in started:
            _kill_tree(process)

    digests, manifest = _artifacts(output, corpus)
    assert manifest["counts"]["samples"] == sum([6, 9, 4, 8, 7, 5, 9, 6]), log.read_text()
    reference = tmp_path / "reference"
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "score", *_score_command(corpus, llama_dir, llama_history_dir, reference, cache),
         *SLOW_SCORING],
        cwd=ROOT, env=_environment(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert _artifacts(reference, corpus) == (digests, manifest)
    assert not list(output.glob(".*.tmp-*"))
    assert json.loads((output / "manifest.json").read_text())["selection"]["granularity"] == "global"
