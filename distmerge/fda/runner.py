"""Running FDA's independent jobs on Ray: one task per job with declared resources, a bounded number in
flight, retried by Ray when the worker process running it dies, progress on the driver.

Ray tasks rather than long-lived actors: every job already reads only its own layer, so nothing is gained by
keeping a process per worker, while tasks reuse warm worker processes (no torch import per job) and Ray
re-executes a task whose process died (``max_retries``; exceptions raised by the job itself are not retried,
they are errors to report)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any

from distmerge.errors import DistmergeError


class FdaJobError(DistmergeError):
    """A job failed for a reason other than bad input (its process died more often than retries allow)."""


def torch_threads(num_cpus: float) -> int:
    """Threads for torch in a job: the CPUs it was given (oversubscription costs far more than it gains)."""
    import torch

    threads = max(1, int(num_cpus))
    torch.set_num_threads(threads)
    return threads


def job_device() -> str:
    """cuda when Ray gave this job a GPU, else cpu: the same code runs on both."""
    import ray
    import torch

    try:
        gpus = ray.get_gpu_ids()
    except Exception:
        gpus = []
    return "cuda" if gpus and torch.cuda.is_available() else "cpu"


def run_jobs(fn: Callable, spec: Any, jobs: Sequence[Any], *, options: dict[str, Any], names: Sequence[str],
             workers: int | None = None, desc: str = "jobs", progress: bool = True,
             describe: Callable[[Any], str] | None = None, on_result: Callable[[Any], None] | None = None) -> list:
    """Run ``fn(spec, job)`` for every job as a Ray task; results in job order.

    At most ``workers`` jobs are in flight (default: as many as the cluster's resources admit); Ray queues the
    rest. The first failure cancels what is still running and is re-raised (a DistmergeError as itself)."""
    import ray
    from tqdm import tqdm

    if not jobs:
        return []
    remote = ray.remote(fn)
    spec_ref = ray.put(spec)
    limit = max(1, workers or len(jobs))
    results: list[Any] = [None] * len(jobs)
    queue = list(range(len(jobs)))
    pending: dict[Any, int] = {}
    bar = tqdm(total=len(jobs), desc=desc, unit="job", disable=not progress, file=sys.stderr, leave=True)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                index = queue.pop(0)
                ref = remote.options(name=names[index], **options).remote(spec_ref, jobs[index])
                pending[ref] = index
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                index = pending.pop(ref)
                results[index] = _get(ref, names[index])
                bar.update(1)
                if progress and describe is not None:
                    bar.write(describe(results[index]), file=sys.stderr)
                if on_result is not None:
                    on_result(results[index])
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
    return results


def _get(ref, name: str):
    import ray

    from distmerge.engine.ray_session import get

    try:
        return get(ref)
    except (ray.exceptions.WorkerCrashedError, ray.exceptions.OutOfMemoryError,
            ray.exceptions.NodeDiedError) as exc:
        raise FdaJobError(f"job '{name}' failed after its retries: {str(exc).strip().splitlines()[0]}") from None
