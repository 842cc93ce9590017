"""Embedded Ray: loopback only, sized, bounded, gone afterwards; an initialised Ray is reused."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pipeline.runtime import ray_session
from pipeline.runtime.errors import UserError
from pipeline.runtime.ray_settings import RaySettings

ROOT = Path(__file__).resolve().parents[3]

_PROBE = """
import json, os, subprocess, psutil
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # ray_session must set it itself
from pipeline.runtime.ray_session import ray_session
from pipeline.runtime.ray_settings import RaySettings
with ray_session(RaySettings(num_cpus=1, object_store_mb=300)) as runtime:
    import ray
    pids = [p.pid for p in psutil.Process().children(recursive=True)] + [os.getpid()]
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    print(json.dumps({"pids": pids, "ss": listening, "embedded": runtime.embedded, "owned": runtime.owned,
                      "cpus": runtime.cpus, "store": ray.cluster_resources()["object_store_memory"]}))
"""


def test_embedded_ray_listens_on_loopback_only_and_leaves_nothing_behind():
    environment = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [sys.executable, "-c", _PROBE], cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["embedded"] and report["owned"] and report["cpus"] == 1.0
    assert report["store"] == 300 * 1024**2
    ours = set(report["pids"])
    addresses = []
    for line in report["ss"].splitlines():
        pids = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if pids & ours:
            addresses.append(line.split()[3])  # Local Address:Port
    assert addresses, "the probe found no Ray listener at all"
    assert all(a.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")) for a in addresses), addresses
    deadline = time.monotonic() + 20
    while any(psutil.pid_exists(p) for p in ours) and time.monotonic() < deadline:
        time.sleep(0.5)
    alive = [p for p in ours if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"Ray processes left running: {alive}"


def test_an_initialised_ray_is_reused_and_left_running(ray_local):
    with ray_session.ray_session(RaySettings(address="127.0.0.1:1")) as runtime:  # the address is not even tried
        assert not runtime.owned and runtime.cpus == 2.0 and runtime.nodes == 1
    assert ray_local.is_initialized()


def test_cluster_address_comes_from_the_flag_then_the_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_session.cluster_address(None) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_session.cluster_address(None) == "10.0.0.1:6379"
    assert ray_session.cluster_address("auto") == "auto"


def test_object_store_default_is_bounded():
    size = ray_session.default_object_store_bytes()
    assert 256 * 1024**2 <= size <= 2 * 1024**3


def _power(base: int, exponent: int) -> int:
    time.sleep(0.05 * (exponent % 3))  # finish out of order
    return base**exponent


def test_ordered_map_keeps_argument_order(ray_local):
    results = list(ray_session.ordered_map(_power, [(2, i) for i in range(7)], num_cpus=0.5, window=2))
    assert results == [2**i for i in range(7)]


def test_an_unreachable_cluster_is_one_clear_line_within_the_timeout():
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        ray_session.wait_for_cluster("127.0.0.1:1", timeout_s=1.0)
    assert 1.0 <= time.monotonic() - started < 10
    message = str(refused.value)
    assert message.startswith("cannot reach the Ray cluster at 127.0.0.1:1: ") and "waited 1 s" in message
    assert "\n" not in message and isinstance(refused.value, UserError)


def test_ray_errors_lose_colour_codes_and_tracebacks():
    noisy = "\x1b[31mFailed to connect to GCS.\x1b[0m\nTraceback (most recent call last):\n  ..."
    message = str(ray_session._unreachable("ray://10.0.0.1:10001", noisy))
    assert "\x1b" not in message and "\n" not in message and "Failed to connect to GCS;" in message


def test_cluster_addresses_that_can_be_probed():
    assert ray_session._host_port("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert ray_session._host_port("ray://head:10001") == ("head", 10001)
    assert ray_session._host_port("[::1]:6379") == ("::1", 6379)
    assert ray_session._host_port("auto") is None
