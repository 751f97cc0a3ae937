"""``distmerge cluster up|down|status``, ``distmerge submit``, ``distmerge jobs list|logs|stop``.

Exit codes: 0 done (a waited-for job SUCCEEDED), 1 the job FAILED or was STOPPED, 2 a user error (one line
``error: ...``), 130 interrupted while watching (the job keeps running).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from distmerge.cli_support import fail as _fail
from distmerge.errors import DistmergeError

cluster_app = typer.Typer(add_completion=False, no_args_is_help=True,
                          help="A local Ray head for pipelines (loopback, token auth).")
jobs_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Jobs on the cluster: list, logs, stop.")

ADDRESS_HELP = "dashboard address (http://HOST:8265); default: RAY_ADDRESS, then the local cluster"


def _quiet_ray_client() -> None:
    """Ray's client logs every packaging step at INFO; the CLI says what matters itself."""
    import logging

    import ray.job_submission  # noqa: F401  (creates the loggers quieted below)

    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.WARNING)


def _note(message: str) -> None:
    typer.echo(message, err=True)


def _parse_size(value: Optional[str], where: str) -> Optional[int]:
    if value is None:
        return None
    from distmerge.config import parse_size

    return parse_size(value, where)


@cluster_app.command("up")
def cluster_up_cmd(
    num_cpus: Optional[int] = typer.Option(None, "--num-cpus", min=1, help="logical CPUs (default: this machine's)"),
    num_gpus: Optional[int] = typer.Option(None, "--num-gpus", min=0, help="GPUs (default: those visible)"),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="the address Ray binds and advertises: loopback (this machine only), or a private "
                                  "interface's address for other machines to join"),
    port: int = typer.Option(6379, "--port", help="GCS port"),
    dashboard_port: int = typer.Option(8265, "--dashboard-port", help="dashboard and Jobs API port (127.0.0.1)"),
    client_port: int = typer.Option(10001, "--client-port", help="Ray Client server port"),
    agent_port: int = typer.Option(52365, "--agent-port", help="dashboard agent HTTP port"),
    object_store_memory: Optional[str] = typer.Option(None, "--object-store-memory",
                                                      help="e.g. 4GB (default: Ray's, 30% of RAM)"),
    temp_dir: Optional[str] = typer.Option(None, "--temp-dir", help="Ray's session folder (default /tmp/ray)"),
) -> None:
    """Start a Ray head on this machine: every port on 127.0.0.1 (or --host), token auth on (token file 0600),
    jobs run with this Python."""
    import os

    from distmerge import jobs

    try:
        spec = jobs.LocalClusterSpec(num_cpus=num_cpus or os.cpu_count() or 1,
                                     num_gpus=jobs.default_num_gpus() if num_gpus is None else num_gpus,
                                     host=host, port=port, dashboard_port=dashboard_port, client_port=client_port,
                                     agent_port=agent_port,
                                     object_store_memory=_parse_size(object_store_memory, "--object-store-memory"),
                                     temp_dir=temp_dir)
        state = jobs.cluster_up(spec)
    except DistmergeError as exc:
        _fail(exc)
    token = state.token_path or "RAY_AUTH_TOKEN"
    typer.echo(f"Ray head up: dashboard {state.address}, GCS {state.gcs_address}, {state.num_cpus} CPU(s), "
               f"{state.num_gpus} GPU(s), token auth on (token: {token})")
    _note(f"submit with: distmerge submit pipelines/quickstart.py -- --preset tiny; stop with: distmerge cluster down")


@cluster_app.command("down")
def cluster_down_cmd() -> None:
    """Stop the local Ray head started by `cluster up` (only that one)."""
    from distmerge import jobs

    try:
        typer.echo(jobs.cluster_down())
    except DistmergeError as exc:
        _fail(exc)


@cluster_app.command("status")
def cluster_status_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable")) -> None:
    """Whether the local cluster is up, its address and resources, and every port its processes listen on."""
    import json

    from distmerge import jobs

    try:
        status = jobs.cluster_status()
    except DistmergeError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(status, indent=2))
    elif status["running"]:
        typer.echo(f"up: dashboard {status['address']}, GCS {status['gcs_address']}, {status['num_cpus']} CPU(s), "
                   f"{status['num_gpus']} GPU(s), Ray {status['ray_version']}, pid {status['pid']}")
    else:
        typer.echo(f"down: {status['message']}")
    if not as_json and "listening" in status:
        _print_listening(status["listening"])
    if not status["running"]:
        raise typer.Exit(code=1)


def _print_listening(listening: list[dict]) -> None:
    for entry in listening:
        reach = ("loopback only" if entry["loopback"] else "every interface" if entry["every_interface"]
                 else f"{entry['address']} only")
        typer.echo(f"  listening {entry['endpoint']} ({entry['process']}, pid {entry['pid']}): {reach}")
    exposed = sum(1 for entry in listening if not entry["loopback"])
    typer.echo(f"{len(listening)} listening port(s), " + (f"{exposed} reachable from other machines (token auth "
                                                          "guards them)" if exposed else "all on loopback"))


def submit_cmd(
    pipeline: Path = typer.Argument(..., help="the pipeline script, e.g. pipelines/nlg_fda.py"),
    pipeline_args: Optional[List[str]] = typer.Argument(None, help="arguments for the pipeline, after --"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    no_wait: bool = typer.Option(False, "--no-wait", help="print the job id and return"),
    project: Optional[Path] = typer.Option(None, "--project",
                                           help="folder shipped as the job's working_dir (default: the pipeline's "
                                                "project, the nearest folder with a pyproject.toml)"),
    entrypoint_gpus: Optional[float] = typer.Option(None, "--entrypoint-gpus", min=0,
                                                    help="GPUs reserved for the pipeline's driver process"),
) -> None:
    """Run a pipeline on the cluster as a Ray job; stream its logs and exit with its status."""
    from distmerge import jobs

    args = list(pipeline_args or [])
    _quiet_ray_client()
    try:
        submission, client = jobs.submit(pipeline, args, address=address, project=project,
                                         entrypoint_num_gpus=entrypoint_gpus)
    except DistmergeError as exc:
        _fail(exc)
    if no_wait:
        typer.echo(submission.job_id)
        _note(f"follow with: distmerge jobs logs {submission.job_id} --follow")
        return
    _note(f"submitted {submission.job_id} to {submission.target.address} (pipeline {submission.metadata['pipeline']}, "
          f"config {submission.metadata['config_hash']}); logs follow")
    _watch(client, submission.job_id)


def _watch(client, job_id: str) -> None:
    from distmerge import jobs

    try:
        status = jobs.follow(client, job_id, sys.stdout)
        info = jobs.job_info(client, job_id)
    except KeyboardInterrupt:
        _note(f"stopped watching; job {job_id} keeps running (distmerge jobs stop {job_id})")
        raise typer.Exit(code=130)
    except DistmergeError as exc:
        _fail(exc)
    detail = f": {info.message.strip()}" if status != "SUCCEEDED" and info.message else ""
    _note(f"job {job_id} {status}{detail}")
    raise typer.Exit(code=jobs.exit_code(status))


@jobs_app.command("list")
def jobs_list_cmd(address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP)) -> None:
    """Jobs submitted to the cluster, oldest first."""
    from distmerge import jobs

    try:
        client, _ = jobs.connect(address)
        rows = jobs.list_jobs(client)
    except DistmergeError as exc:
        _fail(exc)
    if not rows:
        typer.echo("no jobs")
        return
    header = ("JOB ID", "STATUS", "PIPELINE", "CONFIG", "STARTED", "TIME", "MESSAGE")
    table = [header] + [(r.job_id, r.status, r.pipeline, r.config_hash, r.started, r.duration, r.message[:60])
                        for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])


@jobs_app.command("logs")
def jobs_logs_cmd(
    job_id: str = typer.Argument(..., help="the job id `submit` printed"),
    follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends; exit with its status"),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
) -> None:
    """A job's logs (driver output)."""
    from distmerge import jobs

    try:
        client, _ = jobs.connect(address)
        jobs.job_info(client, job_id)
        if not follow:
            typer.echo(client.get_job_logs(job_id), nl=False)
            return
    except DistmergeError as exc:
        _fail(exc)
    _watch(client, job_id)


@jobs_app.command("stop")
def jobs_stop_cmd(
    job_id: str = typer.Argument(...),
    address: Optional[str] = typer.Option(None, "--address", help=ADDRESS_HELP),
    timeout: float = typer.Option(60.0, "--timeout", min=1, help="seconds to wait for the job to stop"),
) -> None:
    """Stop a running job and wait until it has stopped."""
    from distmerge import jobs

    try:
        client, _ = jobs.connect(address)
        before = jobs.job_info(client, job_id).status.value
        status = jobs.stop_job(client, job_id, timeout=timeout)
    except DistmergeError as exc:
        _fail(exc)
    if before in jobs.TERMINAL:
        typer.echo(f"job {job_id} had already ended: {status}")
    else:
        typer.echo(f"job {job_id} {status}")


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")
    app.command("submit")(submit_cmd)
    app.add_typer(jobs_app, name="jobs")
