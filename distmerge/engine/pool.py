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

Across processes: a merge against a cluster it connected to (``parked``) starts its workers detached and parks
them on the cluster when it finishes; the next ``distmerge merge`` process with the same code, worker count and
resources claims them (``engine.parking`` has the leases that end a set whose holder died or that nobody claimed).
"""

from __future__ import annotations

import hashlib
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

from distmerge.engine import parking
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
CLAIM_TIMEOUT_S = 10


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
    timer: threading.Timer | None  # None for a set parked on the cluster (its leases keep the time)


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
    if old is not None and old.timer is not None:
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


def _parked_sets() -> dict[tuple[str, str], dict[int, str]]:
    """(key hash, run id) -> {slot: actor name} of every detached worker set on the cluster, parked or held."""
    sets: dict[tuple[str, str], dict[int, tuple[int, str]]] = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        parts = entry["name"].split("-")
        if entry["namespace"] != parking.NAMESPACE or len(parts) != 6 or parts[:2] != ["distmerge", "merge"] \
                or not parts[4][1:].isdigit() or not parts[5].isdigit():
            continue
        slots = sets.setdefault((parts[2], parts[3]), {})
        slot, incarnation = int(parts[4][1:]), int(parts[5])
        if incarnation >= slots.get(slot, (-1, ""))[0]:  # a replaced actor's name may linger while it exits
            slots[slot] = (incarnation, entry["name"])
    return {key: {slot: name for slot, (_, name) in slots.items()} for key, slots in sets.items()}


def _claim_set(names: dict[int, str]) -> tuple[Any, list] | None:
    """(placement group, actors) of a parked set, claimed for this process's job; None when another merge holds
    it or it is going. Slot 0 is the set's lock: once it is ours, a slot that will not follow ends the set."""
    if sorted(names) != list(range(len(names))):
        return None  # a slot is missing: its lease ends the set
    job = ray.get_runtime_context().get_job_id()
    try:
        actors = [ray.get_actor(names[slot], namespace=parking.NAMESPACE) for slot in sorted(names)]
        group = ray.get(actors[0].claim.remote(job), timeout=CLAIM_TIMEOUT_S)
    except Exception:  # noqa: BLE001 - gone or hung: not ours to use
        return None
    if group is None:
        return None
    try:
        if all(g is not None for g in ray.get([a.claim.remote(job) for a in actors[1:]], timeout=CLAIM_TIMEOUT_S)):
            return group, actors
    except Exception:  # noqa: BLE001
        pass
    _stop(group, actors, graceful=False)
    return None


def _claim_parked(key: tuple | None, key_hash: str | None) -> _WarmWorkers | None:
    """A parked set for this merge (the key's hash names it), claimed; every other parked set is stopped (it
    holds CPUs this merge may need, as a warm set in this process would be). No key: stop them all."""
    found = None
    for (set_hash, run_id), names in _parked_sets().items():
        claimed = _claim_set(names)
        if claimed is None:
            continue
        if found is None and set_hash == key_hash:
            found = _WarmWorkers(key, run_id, claimed[0], claimed[1], timer=None)
        else:
            _stop(*claimed, graceful=True)
    return found


def release_parked_workers() -> None:
    """Stop the worker sets parked on the connected cluster (another distmerge workload needs the CPUs)."""
    _claim_parked(None, None)


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
    sizes: list[int]  # bytes of input each call covers, for progress
    reads: Callable[[Any], int] | None = None  # a call's result -> the bytes it read, where that may be less

    def bytes_read(self, call: int, value: Any) -> int:
        return self.reads(value) if self.reads is not None else self.sizes[call]


class WorkerPool:
    def __init__(self, specs: list[WorkerSpec], num_cpus: float, num_gpus: float, placement: str,
                 parked: bool = False):
        """``parked``: Ray outlives this process (a cluster it connected to): detached workers, parked at the end."""
        self.specs = specs
        self.num_cpus, self.num_gpus = num_cpus, num_gpus
        self.parked = parked
        self.replacements = [0] * len(specs)
        self.incarnation_bytes = [0] * len(specs)  # input bytes of the calls each live actor returned
        self.retired_bytes_read = 0  # input bytes read by actors that died and were replaced
        if self.parked:
            self.key = (parking.code_fingerprint(), len(specs), num_cpus, num_gpus, placement)
            self.key_hash = hashlib.sha256(repr(self.key).encode()).hexdigest()[:10]
            warm = _claim_parked(self.key, self.key_hash)
        else:
            self.key = (_session_key(), len(specs), num_cpus, num_gpus, placement)
            warm = _take_warm(self.key)
        self.reused = self._reuse(warm)
        if self.reused:
            return
        self.run_id = uuid.uuid4().hex[:6]
        bundle = {"CPU": num_cpus} | ({"GPU": num_gpus} if num_gpus else {})
        strategy = {"pack": "PACK", "spread": "SPREAD", "strict_spread": "STRICT_SPREAD"}[placement]
        self.group = placement_group([dict(bundle) for _ in specs], strategy=strategy,
                                     name=f"distmerge-merge-{self.run_id}",
                                     lifetime="detached" if self.parked else None)
        ready, _ = ray.wait([self.group.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            remove_placement_group(self.group)
            raise DistmergeError(f"the cluster cannot place {len(specs)} merge worker(s) of {bundle} "
                                 f"with placement '{placement}' within {PLACEMENT_TIMEOUT_S} s; "
                                 f"cluster resources: {ray.cluster_resources()}")
        self._lease_specs()
        self.actors = [self._start(i) for i in range(len(specs))]

    def _lease_specs(self) -> None:
        """A detached worker's lease names its set and this merge's job (replacements take it too)."""
        if self.parked:
            lease = parking.LeaseSpec(self.group, ray.get_runtime_context().get_job_id())
            self.specs = [replace(spec, lease=lease) for spec in self.specs]

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
        self._lease_specs()
        return True

    def _start(self, slot: int):
        spec = replace(self.specs[slot], incarnation=self.replacements[slot])
        if self.parked:
            where = {"name": f"distmerge-merge-{self.key_hash}-{self.run_id}-w{slot}-{spec.incarnation}",
                     "namespace": parking.NAMESPACE, "lifetime": "detached"}
        else:
            where = {"name": f"distmerge-merge-worker-{slot}-{self.run_id}-{spec.incarnation}"}
        return _merge_worker_class().options(
            **where, num_cpus=self.num_cpus, num_gpus=self.num_gpus, max_restarts=0,
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
            self.incarnation_bytes[slot] += item.bytes_read(call, value)
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
        if self.parked:
            if graceful and keep_warm and seconds > 0:
                try:
                    if all(ray.get([actor.park.remote(seconds) for actor in self.actors], timeout=RESET_TIMEOUT_S)):
                        return
                except Exception as exc:  # noqa: BLE001 - a worker that cannot park: stop the set
                    LOG.info("merge workers could not be parked (%s); stopping them", type(exc).__name__)
            _stop(self.group, self.actors, graceful)
            return
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
