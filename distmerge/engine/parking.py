"""Merge workers that outlive their process: parked on a cluster between two ``distmerge merge`` commands.

A merge against a cluster it did not start (``--address``, RAY_ADDRESS, a Ray Job's driver) runs its workers as
detached actors in a detached placement group, so that the next merge's process, within the warm seconds
(``DISTMERGE_WARM_WORKERS_S``), takes them instead of starting actors that import torch again (seconds each).
A detached actor outlives whoever started it, so each worker keeps a ``Lease`` that watches for itself:

* held by a merge: the set goes as soon as the GCS says that merge's Ray job is dead (its process killed,
  crashed, or its Ray Job stopped), so a dead driver never leaves CPUs held;
* parked after a merge: the set goes when no merge claims it within the warm seconds.

The set goes by removing its placement group, which ends every actor in it. Finding, claiming and parking sets
from the driver's side is ``engine.pool``'s.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger(__name__)

NAMESPACE = "distmerge-parked"
POLL_S = 1.0  # how often a lease looks at its deadline and its holder's job
# Settings a worker reads from its own environment: a set started under other values is not reused.
WORKER_ENV = ("DISTMERGE_COMPILED",)


@dataclass(frozen=True)
class LeaseSpec:
    group: Any  # the set's detached placement group
    job_id: str  # hex id of the Ray job whose merge holds the set


def job_alive(job_id: str) -> bool:
    """False only once the GCS says the job is dead. Any doubt (the job not yet listed, the GCS slow) counts as
    alive: the lease looks again a second later."""
    from ray._private import state  # the GCS job table; no public API reads it without the dashboard

    try:
        for job in state.jobs():
            if job["JobID"] == job_id:
                return not job["IsDead"]
    except Exception as exc:  # noqa: BLE001
        LOG.debug("job table unavailable: %s", exc)
    return True


def remove_group(group: Any) -> None:
    from ray.util.placement_group import remove_placement_group

    remove_placement_group(group)


class Lease:
    """Who holds a parked worker set: one merge's job, or nobody until a deadline. ``claim`` and ``park`` come in
    as the actor's calls; the watching thread ends the set when its holder's job is dead or the deadline passed."""

    def __init__(self, spec: LeaseSpec, *, alive: Callable[[str], bool] = job_alive,
                 remove: Callable[[Any], None] = remove_group, poll_s: float = POLL_S):
        self.group = spec.group
        self._alive, self._remove, self._poll_s = alive, remove, poll_s
        self._lock = threading.Lock()
        self._holder: str | None = spec.job_id
        self._deadline: float | None = None  # monotonic; set only while parked
        self.ended: str | None = None  # why the set was ended, once it was
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distmerge-lease", daemon=True)
        self._thread.start()

    def claim(self, job_id: str) -> bool:
        """Take a parked set for ``job_id``'s merge; False if another merge holds it or it is being ended."""
        with self._lock:
            if self.ended is not None or self._holder is not None:
                return False
            self._holder, self._deadline = job_id, None
            return True

    def park(self, seconds: float) -> None:
        with self._lock:
            self._holder, self._deadline = None, time.monotonic() + seconds

    def close(self) -> None:
        """Stop watching (the set is being stopped by its driver)."""
        self._stop.set()

    def _reason_to_end(self) -> str | None:
        with self._lock:
            holder, deadline = self._holder, self._deadline
        if holder is None:
            return "unclaimed" if deadline is not None and time.monotonic() >= deadline else None
        if self._alive(holder):  # outside the lock: a call to the GCS
            return None
        with self._lock:  # still the same holder? (a claim cannot come in while held, but be exact)
            return f"job {holder} is dead" if self._holder == holder else None

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_s):
            reason = self._reason_to_end()
            if reason is None:
                continue
            with self._lock:
                if reason == "unclaimed" and self._holder is not None:
                    continue  # claimed just now
                self.ended = reason
            LOG.info("parked merge workers: ending the set (%s)", reason)
            try:
                self._remove(self.group)
            except Exception as exc:  # noqa: BLE001 - already gone
                LOG.debug("removing the placement group: %s", exc)
            return


_fingerprint: str | None = None


def code_fingerprint() -> str:
    """The distmerge code and worker settings of this process: a parked set runs the code of the merge that
    started it, so only a merge with the same code and settings takes it."""
    global _fingerprint
    if _fingerprint is None:
        digest = hashlib.sha256()
        package = Path(__file__).resolve().parents[1]
        for path in sorted(package.rglob("*.py")):
            digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
        for name in WORKER_ENV:
            digest.update(f"{name}={os.environ.get(name)}\0".encode())
        _fingerprint = digest.hexdigest()[:12]
    return _fingerprint
