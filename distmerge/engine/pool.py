"""The merge actors: one per worker slot, placed by a placement group, replaced when one dies.

Each slot runs an ordered list of work items (a reduction-pass group, or a whole output shard); an item is
done when its last call returns. When a slot's actor dies (node lost, OOM-killed, killed by hand), a fresh
actor takes the slot and redoes the slot's unfinished items from their start: a shard is only ever recorded
from a call that returned, and files are renamed into place only when complete, so nothing a dead actor
left half-written is used.

A dead actor cannot report what it read, so the pool counts it from the calls it ran: the input bytes of
every call it returned, plus the call it was running when it died (that call had started on its inputs;
a kill part-way through a read overstates by at most that one call).

Warm workers: starting an actor (a process that imports torch) costs seconds, more than a small merge. A merge
that ran in a Ray session it did not start, with no other distmerge workload around it, leaves its actors and
placement group idle for ``DISTMERGE_WARM_WORKERS_S`` seconds (default 10; 0: never); the next merge with the
same worker count and resources takes them, re-specced (``MergeWorker.reset``). Idle workers hold their CPUs, so
they go when that time is up, when any other distmerge workload enters ``ray_session``, and before a session
distmerge started stops. A merge that failed never leaves its workers warm.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from distmerge.engine.ray_session import get
from distmerge.engine.worker import MergeWorker, WorkerSpec
from distmerge.errors import DistmergeError

LOG = logging.getLogger(__name__)

MAX_REPLACEMENTS = 3  # per slot and run: beyond this, a slot's failure is taken as the input's, not the node's
PLACEMENT_TIMEOUT_S = 120
EXIT_WAIT_S = 10  # for actors to exit before their placement group goes
WARM_ENV = "DISTMERGE_WARM_WORKERS_S"
WARM_DEFAULT_S = 10.0
RESET_TIMEOUT_S = 60


def warm_seconds() -> float:
    """How long a finished merge's workers wait for the next merge (0: they stop with their merge)."""
    try:
        value = float(os.environ.get(WARM_ENV, WARM_DEFAULT_S))
    except ValueError:
        LOG.warning("%s=%r is not a number of seconds; using %s", WARM_ENV, os.environ[WARM_ENV], WARM_DEFAULT_S)
        return WARM_DEFAULT_S
    return value if value > 0 else 0.0


@dataclass
class _WarmWorkers:
    key: tuple  # (Ray session, worker count, CPUs and GPUs per worker, placement)
    run_id: str
    group: Any
    actors: list
    timer: threading.Timer


_warm: _WarmWorkers | None = None
_warm_lock = threading.Lock()
_remote_worker = None


def _session_key() -> str:
    return ray.get_runtime_context().get_node_id() + ":" + str(ray.get_runtime_context().get_job_id())


def _swap_warm(new: _WarmWorkers | None) -> _WarmWorkers | None:
    """Put ``new`` in the warm slot; the set it held, its timer cancelled."""
    global _warm
    with _warm_lock:
        old, _warm = _warm, new
    if old is not None:
        old.timer.cancel()
    return old


def _stop_warm(warm: _WarmWorkers | None) -> None:
    try:
        if warm is not None and ray.is_initialized():
            _stop(warm.group, warm.actors, graceful=True)
    except Exception as exc:  # noqa: BLE001 - the timer's thread may race a shutdown; the actors go with it
        LOG.debug("releasing warm merge workers: %s", exc)


def release_warm_workers() -> None:
    """Stop the idle workers a finished merge left warm, if any (their CPUs are free again on return)."""
    _stop_warm(_swap_warm(None))


def _take_warm(key: tuple) -> _WarmWorkers | None:
    warm = _swap_warm(None)
    if warm is not None and warm.key != key:
        _stop_warm(warm)
        return None
    return warm


def _merge_worker_class():
    """``ray.remote(MergeWorker)`` once per process: every call would export the class again (a disassembly of
    its code, a fraction of a second per merge)."""
    global _remote_worker
    if _remote_worker is None:
        _remote_worker = ray.remote(MergeWorker)
    return _remote_worker


@dataclass
class WorkItem:
    """Calls on one actor that together finish one unit (``submit`` makes them; the last result counts)."""

    key: Any
    submit: Callable[[Any], list]  # actor -> object refs, in order
    sizes: list[int]  # bytes of input each call reads, for progress


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], num_cpus: float, num_gpus: float, placement: str):
        self.specs = specs
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.replacements = [0] * len(specs)
        self.incarnation_bytes = [0] * len(specs)  # input bytes of the calls each live actor returned
        self.retired_bytes_read = 0  # input bytes read by actors that died and were replaced
        self.key = (_session_key(), len(specs), num_cpus, num_gpus, placement)
        if self._reuse(_take_warm(self.key)):
            return
        self.run_id = uuid.uuid4().hex[:6]
        bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
        strategy = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}[placement]
        self.group = placement_group([dict(bundle) for _ in specs], strategy=strategy,
                                     name=f"distmerge-merge-{self.run_id}")
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise DistmergeError(f"the cluster cannot place {len(specs)} merge worker(s) of {bundle} "
                                 f"with placement '{placement}' within {PLACEMENT_TIMEOUT_S} s; "
                                 f"cluster resources: {ray.cluster_resources()}")
        self.actors = [self._start(i) for i in range(len(specs))]

    def _reuse(self, warm: _WarmWorkers | None) -> bool:
        """Take a finished merge's idle workers, given this merge's specs; any that cannot be reset (dead, hung)
        and the whole set goes, and fresh actors start instead."""
        if warm is None:
            return False
        try:
            ray.get([actor.reset.remote(spec) for actor, spec in zip(warm.actors, self.specs)],
                    timeout=RESET_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure: start afresh
            LOG.info("warm merge workers could not be reused (%s); starting new ones", type(exc).__name__)
            _stop(warm.group, warm.actors, graceful=False)
            return False
        self.run_id, self.group, self.actors = warm.run_id, warm.group, warm.actors
        return True

    def _start(self, slot: int):
        spec = replace(self.specs[slot], incarnation=self.replacements[slot])
        return _merge_worker_class().options(
            name=f"distmerge-merge-worker-{slot}-{self.run_id}-{spec.incarnation}",
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=slot),
        ).remote(spec)

    def replace(self, slot: int, cause: BaseException, running_bytes: int = 0) -> None:
        self.retired_bytes_read += self.incarnation_bytes[slot] + running_bytes
        self.incarnation_bytes[slot] = 0
        self.replacements[slot] += 1
        if self.replacements[slot] > MAX_REPLACEMENTS:
            raise DistmergeError(f"merge worker {slot} died {self.replacements[slot]} times; last: {cause}")
        LOG.warning("merge worker %d died (%s); a fresh actor redoes its unfinished work", slot,
                    str(cause).splitlines()[0] if str(cause) else type(cause).__name__)
        try:
            ray.kill(self.actors[slot])
        except Exception:
            pass
        self.actors[slot] = self._start(slot)

    def run(self, items: list[list[WorkItem]], on_done: Callable[[WorkItem, Any], None],
            on_progress: Callable[[int], None] = lambda nbytes: None) -> None:
        """Run every slot's items in order; redo a dead slot's unfinished items on a replacement actor.

        ``on_progress`` gets the input bytes of each finished call (negative when a dead slot's unfinished
        items are redone), ``on_done`` each item's last result.
        """
        queued = [list(slot_items) for slot_items in items]
        done: list[set[int]] = [set() for _ in items]
        counted: list[dict[int, int]] = [{} for _ in items]  # bytes reported per item so far
        pending: dict[Any, tuple[int, int, int]] = {}  # ref -> (slot, item index, call index)

        def submit(slot: int) -> None:
            for index, item in enumerate(queued[slot]):
                for call, ref in enumerate(item.submit(self.actors[slot])):
                    pending[ref] = (slot, index, call)

        for slot in range(len(items)):
            submit(slot)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            slot, index, call = pending.pop(ready[0])
            try:
                value = get(ready[0])
            except ray.exceptions.ActorDiedError as exc:
                failed = [(index, call)] + [(i, c) for s, i, c in pending.values() if s == slot]
                for ref in [r for r, (s, _, _) in pending.items() if s == slot]:
                    del pending[ref]
                # An actor runs its calls in the order they were submitted: the earliest failed one was running.
                running_index, running_call = min(failed)
                running_bytes = queued[slot][running_index].sizes[running_call]
                unfinished = [i for i in range(len(queued[slot])) if i not in done[slot]]
                on_progress(-sum(counted[slot].get(i, 0) for i in unfinished))
                queued[slot] = [queued[slot][i] for i in unfinished]
                done[slot], counted[slot] = set(), {}
                self.replace(slot, exc, running_bytes)
                submit(slot)
                continue
            item = queued[slot][index]
            self.incarnation_bytes[slot] += item.sizes[call]
            counted[slot][index] = counted[slot].get(index, 0) + item.sizes[call]
            on_progress(item.sizes[call])
            if call == len(item.sizes) - 1:
                done[slot].add(index)
                on_done(item, value)

    def call_all(self, method: str, *args) -> list:
        return get([getattr(actor, method).remote(*args) for actor in self.actors])

    def shutdown(self, graceful: bool = True, keep_warm: bool = False) -> None:
        """Stop every actor and free the placement group; or, with ``keep_warm`` (a merge that finished well),
        leave both idle for the next merge (see the module's docstring)."""
        seconds = warm_seconds()
        if graceful and keep_warm and seconds > 0:
            timer = threading.Timer(seconds, release_warm_workers)
            timer.daemon = True
            previous = _swap_warm(_WarmWorkers(self.key, self.run_id, self.group, self.actors, timer))
            timer.start()
            _stop_warm(previous)
            return
        _stop(self.group, self.actors, graceful)


def _stop(group, actors: list, graceful: bool) -> None:
    """Stop every actor, wait until each has exited, and only then free the placement group.

    Removing the group while an actor is still exiting makes the raylet SIGTERM it mid-exit: the
    signal's exit on the main thread races the one already under way, which can abort the process
    (absl "Mutex corrupt", SIGABRT) and print its crash dump into a successful run's output.
    ``graceful``: let idle actors finish and exit themselves (a run that failed kills them at once).
    """
    exits = {}  # ref -> actor; the ref resolves, as an error, once the actor's process is gone
    for actor in actors:
        try:
            if not graceful:
                ray.kill(actor)
            exits[actor.__ray_terminate__.remote()] = actor
        except Exception:
            pass
    _, alive = ray.wait(list(exits), num_returns=len(exits), timeout=EXIT_WAIT_S) if exits else ([], [])
    if alive and graceful:  # a hung actor
        for ref in alive:
            try:
                ray.kill(exits[ref])
            except Exception:
                pass
        ray.wait(alive, num_returns=len(alive), timeout=EXIT_WAIT_S)
    try:
        remove_placement_group(group)
    except Exception:
        pass
