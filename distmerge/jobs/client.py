"""Talking to a cluster's Jobs API: which address (``--address``, ``RAY_ADDRESS``, the local cluster), a client
with the token, submission, logs, listing and stopping jobs."""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from distmerge.jobs.auth import auth_headers
from distmerge.jobs.errors import HOW_TO_AUTH, HOW_TO_START, ClusterError
from distmerge.jobs.local_cluster import STATE_FILE, ClusterState, read_state, running_state, state_dir
from distmerge.jobs.packaging import build_runtime_env, job_metadata, load_pipeline, submission_id


TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Target:
    """The cluster a command talks to and why that one."""

    address: str
    source: str
    local: Optional[ClusterState] = None


def resolve_address(flag: Optional[str], environ: Mapping[str, str] = os.environ,
                    local: Callable[[Mapping[str, str]], Optional[ClusterState]] = running_state) -> Target:
    if flag:
        return Target(_normalize(flag), "--address")
    if environ.get("RAY_ADDRESS"):
        return Target(_normalize(environ["RAY_ADDRESS"]), "RAY_ADDRESS")
    state = local(environ)
    if state is not None:
        return Target(state.address, f"the local cluster ({state_dir(environ) / STATE_FILE})", state)
    recorded = read_state(environ)
    if recorded is not None:
        raise ClusterError(f"the local cluster recorded at {recorded.address} is not running; {HOW_TO_START}")
    raise ClusterError(f"no Ray cluster to talk to: {HOW_TO_START}")


def _normalize(address: str) -> str:
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ClusterError(f"address '{address}' is a Ray Client address; jobs are submitted to the dashboard: "
                           "use http://HOST:8265")
    if "://" not in address and address != "auto":
        host, _, port = address.rpartition(":")
        if host and port == "6379":
            raise ClusterError(f"address '{address}' is the GCS port; jobs are submitted to the dashboard: "
                               f"use http://{host}:8265")
        address = f"http://{address}"
    return address


def connect(address: Optional[str] = None, environ: Mapping[str, str] = os.environ):
    """A JobSubmissionClient for the resolved cluster, or a one-line ClusterError saying what is wrong."""
    target = resolve_address(address, environ)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(target.address, headers=auth_headers(local=target.local, environ=environ))
    except AuthenticationError as exc:
        raise ClusterError(f"{target.address} (from {target.source}) refused the request: {_first_line(exc)}; "
                           f"{HOW_TO_AUTH}") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"no Ray cluster reachable at {target.address} (from {target.source}): {_first_line(exc)}; "
                           f"{HOW_TO_START}") from None
    return client, target


@dataclass(frozen=True)
class Submission:
    job_id: str
    target: Target
    metadata: dict[str, str]


def submit(pipeline: str | Path, args: list[str], *, address: Optional[str] = None,
           project: str | Path | None = None, environ: Mapping[str, str] = os.environ,
           entrypoint_num_gpus: float | None = None) -> tuple[Submission, Any]:
    """Submit ``python <pipeline> <args>`` as a Ray job; returns the submission and the client."""
    spec = load_pipeline(pipeline, project)
    client, target = connect(address, environ)
    metadata = job_metadata(spec, args)
    entrypoint = shlex.join(["python", spec.relative, *args])
    job_id = submission_id(spec)
    try:
        client.submit_job(entrypoint=entrypoint, submission_id=job_id, runtime_env=build_runtime_env(spec),
                          metadata=metadata, entrypoint_num_gpus=entrypoint_num_gpus)
    except (RuntimeError, ValueError, OSError) as exc:
        raise ClusterError(f"{target.address} did not accept the job: {_first_line(exc)}") from None
    return Submission(job_id=job_id, target=target, metadata=metadata), client


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _status(client, job_id: str) -> str:
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as exc:
        raise ClusterError(f"job '{job_id}': {_first_line(exc)}") from None


def follow(client, job_id: str, out: IO[str], poll: float = 1.0) -> str:
    """Stream the job's logs to ``out`` until it ends; returns its final status."""
    import asyncio

    written = 0

    async def tail() -> None:
        nonlocal written
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()
            written += len(chunk)

    try:
        asyncio.run(tail())
    except Exception:  # noqa: BLE001 - the log stream broke (socket closed, proxy timeout); poll instead
        pass
    status = _status(client, job_id)
    while status not in TERMINAL:
        time.sleep(poll)
        status = _status(client, job_id)
    logs = client.get_job_logs(job_id)
    if len(logs) > written:
        out.write(logs[written:])
        out.flush()
    return status


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as exc:
        raise ClusterError(f"job '{job_id}': {_first_line(exc)}") from None


@dataclass(frozen=True)
class JobRow:
    job_id: str
    status: str
    pipeline: str
    config_hash: str
    started: str
    duration: str
    message: str


def list_jobs(client) -> list[JobRow]:
    rows = []
    jobs = [j for j in client.list_jobs() if j.submission_id]
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        metadata = job.metadata or {}
        start = (job.start_time or 0) / 1000
        end = (job.end_time or 0) / 1000 or time.time()
        rows.append(JobRow(job_id=job.submission_id, status=str(job.status.value),
                           pipeline=metadata.get("pipeline") or job.entrypoint,
                           config_hash=metadata.get("config_hash", "-"),
                           started=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(start)) if start else "-",
                           duration=f"{end - start:.0f}s" if start else "-",
                           message=next(iter((job.message or "").strip().splitlines()), "")))
    return rows


def stop_job(client, job_id: str, timeout: float = 60.0, poll: float = 0.5) -> str:
    """Ask the cluster to stop the job and wait until it has; returns its final status."""
    status = _status(client, job_id)
    if status in TERMINAL:
        return status
    try:
        client.stop_job(job_id)
    except RuntimeError as exc:
        raise ClusterError(f"job '{job_id}': {_first_line(exc)}") from None
    deadline = time.monotonic() + timeout
    while status not in TERMINAL:
        if time.monotonic() > deadline:
            raise ClusterError(f"job '{job_id}' is still {status} {timeout:.0f}s after the stop request")
        time.sleep(poll)
        status = _status(client, job_id)
    return status


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1
