"""Connecting to Ray: an embedded local instance by default, or the cluster named by --address/RAY_ADDRESS."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import ray


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None) -> Iterator[None]:
    """Use the running Ray session if there is one; otherwise start one and stop it afterwards."""
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Embedded: this machine only, dashboard on loopback.
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, dashboard_host="127.0.0.1",
                 include_dashboard=None, log_to_driver=True)
    try:
        yield
    finally:
        ray.shutdown()


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def get(refs):
    """ray.get that re-raises a user-facing error from a task or actor (bad input, bad parameter) as itself,
    without Ray's wrapping; anything else (a bug, a dead worker) propagates as Ray raised it."""
    from distmerge.errors import DistmergeError

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, DistmergeError):
            raise cause from None
        raise
