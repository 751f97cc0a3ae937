"""Leases of merge workers parked on a cluster (engine.parking): who holds a set, when it ends. The whole path,
two `distmerge merge` processes against a real head, is in test_jobs.py."""

from __future__ import annotations

import threading
import time

from distmerge.engine import parking


class Recorder:
    def __init__(self):
        self.removed = threading.Event()
        self.groups = []
        self.dead_jobs: set[str] = set()

    def remove(self, group):
        self.groups.append(group)
        self.removed.set()

    def alive(self, job_id: str) -> bool:
        return job_id not in self.dead_jobs


def lease(recorder: Recorder, job: str = "01000000") -> parking.Lease:
    return parking.Lease(parking.LeaseSpec(group="pg", job_id=job), alive=recorder.alive, remove=recorder.remove,
                         poll_s=0.02)


def test_held_set_ends_when_its_job_dies():
    recorder = Recorder()
    held = lease(recorder)
    time.sleep(0.1)
    assert not recorder.removed.is_set()  # its job is alive: kept
    recorder.dead_jobs.add("01000000")
    assert recorder.removed.wait(2)
    assert recorder.groups == ["pg"] and held.ended == "job 01000000 is dead"
    assert not held.claim("02000000")  # an ended set is nobody's


def test_parked_set_ends_unclaimed_and_a_claim_keeps_it():
    recorder = Recorder()
    kept = lease(recorder)
    assert not kept.claim("02000000")  # held by the merge that started it
    kept.park(0.2)
    assert kept.claim("02000000")
    assert not kept.claim("03000000")  # slot taken: the second claimer starts its own workers
    time.sleep(0.4)
    assert not recorder.removed.is_set()  # claimed before its deadline: the deadline is gone
    recorder.dead_jobs.add("01000000")  # the first holder's death no longer matters
    time.sleep(0.1)
    assert not recorder.removed.is_set()

    kept.park(0.1)
    assert recorder.removed.wait(2)
    assert kept.ended == "unclaimed" and recorder.groups == ["pg"]


def test_close_stops_watching():
    recorder = Recorder()
    closed = lease(recorder)
    closed.close()
    recorder.dead_jobs.add("01000000")
    time.sleep(0.15)
    assert not recorder.removed.is_set()


def test_code_fingerprint_follows_worker_settings(monkeypatch):
    first = parking.code_fingerprint()
    monkeypatch.setattr(parking, "_fingerprint", None)
    monkeypatch.setenv("DISTMERGE_COMPILED", "0")
    assert parking.code_fingerprint() != first
