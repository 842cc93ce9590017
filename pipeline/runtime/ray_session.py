"""Start, join and stop Ray for a stage: an embedded local Ray, or a cluster at an address.

Embedded (no `ray.address`, no RAY_ADDRESS): Ray starts inside this process, sized to the machine,
every listener bound to 127.0.0.1, a bounded object store, quiet logs. With an address (or when
launched by `ray job submit`, which sets RAY_ADDRESS), the same code joins that cluster, after
waiting at most `connect_timeout_s` for it to answer: a cluster that is not there is one clear
line (`UserError`), not minutes of Ray's retries. When Ray is already initialised in this
process (a test fixture, a notebook), it is reused and left running.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import psutil

from pipeline.runtime.errors import UserError
from pipeline.runtime.ray_settings import RaySettings

# Below this Ray refuses to start; above the cap a scoring job gains nothing (only small results
# and histograms travel through the object store).
_MIN_OBJECT_STORE = 256 * 1024**2
_MAX_OBJECT_STORE = 2 * 1024**3

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@dataclass(frozen=True)
class RayRuntime:
    """What `ray_session` connected to."""

    embedded: bool  # a local Ray started here (rather than a cluster joined at an address)
    owned: bool  # this session started Ray, so it shuts it down
    address: str
    cpus: float
    gpus: float
    nodes: int


def machine_cpus() -> int:
    """CPUs this process may use (the affinity mask, not the host's core count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def default_object_store_bytes() -> int:
    """10% of the machine's memory, within [256 MiB, 2 GiB]: Ray's default (30%) starves the models."""
    return int(min(_MAX_OBJECT_STORE, max(_MIN_OBJECT_STORE, psutil.virtual_memory().total // 10)))


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: the explicit address, else RAY_ADDRESS, else None (embedded)."""
    return address or os.environ.get("RAY_ADDRESS") or None


def quiet_ray_logs() -> None:
    """Ray's own logs at WARNING, Ray Data progress bars off: the stage shows its own progress."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    # Embedded Ray warns on every start that token auth is on; that is the safe default, not news.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False


def _host_port(address: str) -> tuple[str, int] | None:
    """HOST and PORT of a cluster address (`ray://` too); None for "auto" and forms Ray resolves itself."""
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _unreachable(address: str, reason: str) -> UserError:
    reason = _ANSI_ESCAPE.sub("", reason).strip().splitlines()[0].rstrip(".") if reason.strip() else "no answer"
    return UserError(
        f"cannot reach the Ray cluster at {address}: {reason}; start it, fix ray.address (--ray.address) or "
        "RAY_ADDRESS, or leave both unset to run on an embedded local Ray (ray.connect_timeout_s sets how long to wait)"
    )


def wait_for_cluster(address: str, timeout_s: float) -> None:
    """Return once the cluster address accepts connections; raise `UserError` after `timeout_s`.

    Ray's own connect retries for minutes with a warning every few seconds, so the port is probed
    first, with a deadline. Addresses Ray resolves itself ("auto") are left to `ray.init`.
    """
    target = _host_port(address)
    if target is None:
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(target, timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                return
        except OSError as error:
            reason = error.strerror or str(error) or type(error).__name__
        if time.monotonic() >= deadline:
            raise _unreachable(address, f"{reason} (waited {timeout_s:g} s)")
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


def _describe(embedded: bool, owned: bool) -> RayRuntime:
    import ray

    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    address = ray.get_runtime_context().gcs_address
    return RayRuntime(embedded, owned, address, resources.get("CPU", 0.0), resources.get("GPU", 0.0), nodes)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Make a local Ray bind 127.0.0.1 only, for as long as it runs.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 turns Ray's "local only" mode on (field notes: every
    listener then binds loopback; `_node_ip_address` alone is rewritten). Ray reads the variable
    once, when `ray` is first imported, so the constant it was read into is set too. Both are
    restored afterwards: joining a real cluster later from this process must see the machine's
    own address again.
    """
    from ray._private import ray_constants

    name = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved_env, saved_flag = os.environ.get(name), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[name] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved_env


@contextmanager
def ray_session(settings: RaySettings | None = None, log_to_driver: bool | None = None) -> Iterator[RayRuntime]:
    """Ray for the duration of a stage (or of a run's stages), as `settings` (a stage's `ray:` section) say.

    address: a cluster to join ("auto", "HOST:PORT", "ray://..."); None = RAY_ADDRESS or embedded.
    num_cpus / object_store_mb: size of the embedded Ray (default: this machine's CPUs; 10% of
    its memory within [256 MiB, 2 GiB]); ignored when joining a cluster, which has its own.
    connect_timeout_s: how long to wait for a cluster at `address` to answer (`UserError`).
    log_to_driver: forward worker output here; default off when embedded (quiet), on for a cluster
    (so `ray job logs` shows what the workers said). Worker exceptions reach the caller either way.
    """
    import ray

    if ray.is_initialized():
        yield _describe(embedded=False, owned=False)
        return
    settings = settings or RaySettings()
    quiet_ray_logs()
    target = cluster_address(settings.address)
    embedded = target is None
    init: dict[str, Any] = {
        "logging_level": logging.WARNING,
        "log_to_driver": (not embedded) if log_to_driver is None else log_to_driver,
    }
    if embedded:
        init |= {
            # "local": a new instance even when `ray start` left a cluster on this machine, which a
            # bare ray.init() would silently join.
            "address": "local",
            "num_cpus": settings.num_cpus or machine_cpus(),
            "object_store_memory": settings.object_store_bytes or default_object_store_bytes(),
            "include_dashboard": False,
        }
    else:
        init["address"] = target
        wait_for_cluster(target, settings.connect_timeout_s)
    with _loopback_only() if embedded else nullcontext():
        try:
            ray.init(**init)
        except (ConnectionError, TimeoutError, ValueError) as error:
            if embedded:
                raise
            raise _unreachable(target, str(error)) from None
        try:
            yield _describe(embedded=embedded, owned=True)
        finally:
            ray.shutdown()


def node_cpus() -> list[float]:
    """CPUs of each alive node of the connected cluster."""
    import ray

    return [node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive")]


def task_error_cause(error: Exception) -> Exception:
    """The exception a Ray task or actor method raised, without Ray's wrapper (whose message carries
    the worker's traceback and colour codes), so a user error reaches the user as its one line."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, Exception) else error


def _get(ref: Any) -> Any:
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(ref)
    except RayTaskError as error:
        raise task_error_cause(error) from None


def ordered_map(
    function: Callable, arguments: list[tuple], num_cpus: float = 1.0, window: int | None = None
) -> Iterator[Any]:
    """Run `function(*args)` as Ray tasks, yielding results in argument order.

    At most `window` tasks are in flight (default: twice the cluster's CPUs), so results waiting
    to be consumed never pile up in the object store. Ray retries a task whose worker died. An
    exception a task raises is re-raised here as itself (`task_error_cause`).
    """
    import ray

    remote = ray.remote(num_cpus=num_cpus, max_retries=3)(function)
    window = window or max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    pending: list[Any] = []
    for args in arguments:
        pending.append(remote.remote(*args))
        if len(pending) >= window:
            yield _get(pending.pop(0))
    while pending:
        yield _get(pending.pop(0))
