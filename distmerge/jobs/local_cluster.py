"""A Ray head on this machine (``cluster up`` / ``down`` / ``status``): loopback or one private address, token
auth, its state recorded so later commands find it and ``down`` stops exactly its processes."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from distmerge.jobs.auth import auth_headers, ensure_token_file
from distmerge.jobs.errors import HOW_TO_START, ClusterError


STATE_DIR_ENV = "DISTMERGE_CLUSTER_DIR"
STATE_FILE = "cluster.json"
START_LOG = "ray-start.log"
BLOCK_MARKER = "This command will now block forever"
LOOPBACK = "127.0.0.1"
# Ray (2.60) swaps a loopback node IP for the machine's own address unless it believes it runs a single-machine
# cluster, which this variable (meant for macOS/Windows) makes it believe on Linux too. With a loopback node IP,
# GCS, raylet, workers and agents listen on loopback only (measured); without it they listen on every interface.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@dataclass(frozen=True)
class LocalClusterSpec:
    """What ``cluster up`` starts: a Ray head on this machine, bound to loopback where Ray allows it."""

    num_cpus: int
    num_gpus: int = 0
    host: str = LOOPBACK
    port: int = 6379
    dashboard_port: int = 8265
    client_port: int = 10001
    agent_port: int = 52365
    object_store_memory: Optional[int] = None
    temp_dir: Optional[str] = None

    def validate(self) -> None:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            raise ClusterError(f"--host: '{self.host}' is not an IP address of this machine (e.g. 127.0.0.1, or a "
                               "private interface's address)") from None
        if self.host in ("0.0.0.0", "::"):
            raise ClusterError(f"--host: {self.host} means every interface; give one address (127.0.0.1 or a "
                               "private interface's)")
        if self.num_cpus < 1:
            raise ClusterError(f"--num-cpus: {self.num_cpus} must be at least 1")
        if self.num_gpus < 0:
            raise ClusterError(f"--num-gpus: {self.num_gpus} must not be negative")
        ports = {"--port": self.port, "--dashboard-port": self.dashboard_port, "--client-port": self.client_port,
                 "--agent-port": self.agent_port}
        for flag, port in ports.items():
            if not 1024 <= port <= 65535:
                raise ClusterError(f"{flag}: {port} is not a port in 1024..65535")
        if len(set(ports.values())) != len(ports):
            raise ClusterError(f"ports must differ: {', '.join(f'{k} {v}' for k, v in ports.items())}")
        if self.object_store_memory is not None and self.object_store_memory < 80 * 2**20:
            raise ClusterError(f"--object-store-memory: {self.object_store_memory} bytes is below Ray's minimum "
                               "(about 75 MiB)")
        if self.temp_dir is not None and len(self.temp_dir) > 60:
            # Ray puts unix sockets under the temp dir; their paths are limited to ~107 characters.
            raise ClusterError(f"--temp-dir: '{self.temp_dir}' is too long for Ray's socket paths (keep it short, "
                               "e.g. /tmp/ray-dm)")


@dataclass
class ClusterState:
    """What ``cluster up`` recorded: enough to find, use and stop the head it started."""

    address: str
    gcs_address: str
    pid: int
    num_cpus: int
    num_gpus: int
    dashboard_port: int
    token_path: Optional[str]
    log_path: str
    temp_dir: Optional[str]
    python: str
    started_at: float


def state_dir(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get(STATE_DIR_ENV) or Path.home() / ".distmerge" / "cluster").expanduser()


def read_state(environ: Mapping[str, str] = os.environ) -> ClusterState | None:
    path = state_dir(environ) / STATE_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        return ClusterState(**{f.name: raw[f.name] for f in dataclasses.fields(ClusterState)})
    except (ValueError, KeyError, TypeError) as exc:
        raise ClusterError(f"local cluster state '{path}' is unreadable ({exc}); remove it and run "
                           "`distmerge cluster up` again") from None


def _write_state(state: ClusterState, environ: Mapping[str, str]) -> Path:
    folder = state_dir(environ)
    folder.mkdir(parents=True, exist_ok=True)
    from distmerge.io import writer  # here: the rest of this module stays free of torch

    path = folder / STATE_FILE
    writer.write_json(path, dataclasses.asdict(state), mode=0o600)
    return path


def _is_our_head(state: ClusterState) -> bool:
    """The recorded pid is still the ``ray start --head --block`` we launched (pids get reused)."""
    import psutil

    try:
        cmdline = psutil.Process(state.pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return "--block" in cmdline and "--head" in cmdline and f"--dashboard-port={state.dashboard_port}" in cmdline


def running_state(environ: Mapping[str, str] = os.environ) -> ClusterState | None:
    """The local cluster's state if its head process is still alive."""
    state = read_state(environ)
    return state if state is not None and _is_our_head(state) else None


def default_num_gpus() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


def ray_start_command(spec: LocalClusterSpec, python: str = sys.executable) -> list[str]:
    """``ray start --head --block`` from this Python: the head stays in the foreground of its own process group,
    so stopping it (SIGTERM) stops exactly this cluster's processes and no other Ray on the machine."""
    command = [python, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--node-ip-address={spec.host}", f"--dashboard-host={spec.host}",
               f"--num-cpus={spec.num_cpus}", f"--num-gpus={spec.num_gpus}",
               f"--port={spec.port}", f"--dashboard-port={spec.dashboard_port}",
               f"--ray-client-server-port={spec.client_port}", f"--dashboard-agent-listen-port={spec.agent_port}",
               "--disable-usage-stats"]
    if spec.object_store_memory is not None:
        command.append(f"--object-store-memory={spec.object_store_memory}")
    if spec.temp_dir is not None:
        command.append(f"--temp-dir={spec.temp_dir}")
    return command


def head_environment(environ: Mapping[str, str], token_path: Optional[Path], python: str,
                     host: str = LOOPBACK) -> dict[str, str]:
    env = dict(environ)
    env.pop("RAY_ADDRESS", None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    if ipaddress.ip_address(host).is_loopback:
        env.update(SINGLE_MACHINE_ENV)
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    # Job entrypoints say `python ...`: they must find this interpreter (and its packages) first.
    env["PATH"] = os.pathsep.join([str(Path(python).parent), env.get("PATH", "")])
    return env


def cluster_up(spec: LocalClusterSpec, *, environ: Mapping[str, str] = os.environ, timeout: float = 180.0,
               python: str = sys.executable) -> ClusterState:
    """Start a Ray head on this machine with token auth and record it; returns once the dashboard answers."""
    spec.validate()
    existing = running_state(environ)
    if existing is not None:
        raise ClusterError(f"a local cluster is already running at {existing.address} (pid {existing.pid}); "
                           "stop it with `distmerge cluster down`")
    token_path = ensure_token_file(environ)
    folder = state_dir(environ)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.temp_dir is not None:
        Path(spec.temp_dir).mkdir(parents=True, exist_ok=True)
    log_path = folder / START_LOG
    env = head_environment(environ, token_path, python, spec.host)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(ray_start_command(spec, python), stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://{_url_host(spec.host)}:{spec.dashboard_port}"
    headers = auth_headers(token_path=token_path, environ=environ)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise ClusterError(f"ray start exited with code {process.returncode}: {_tail(log_path)} "
                               f"(full log: {log_path})")
        # `--block` logs this line once every process is up; the Jobs API answers from then on.
        if BLOCK_MARKER in log_path.read_text(errors="replace") and _dashboard_version(address, headers):
            break
        if time.monotonic() > deadline:
            _stop_process_group(process.pid, grace=30.0)
            raise ClusterError(f"the Ray head did not answer on {address} within {timeout:.0f}s "
                               f"(log: {log_path})")
        time.sleep(0.5)
    state = ClusterState(address=address, gcs_address=_gcs_address(log_path, spec.host, spec.port), pid=process.pid,
                         num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, dashboard_port=spec.dashboard_port,
                         token_path=str(token_path) if token_path else None, log_path=str(log_path),
                         temp_dir=spec.temp_dir, python=python, started_at=time.time())
    _write_state(state, environ)
    return state


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _gcs_address(log_path: Path, host: str, port: int) -> str:
    # The log names the address Ray advertises for the GCS; a single-machine head (loopback) prints none.
    marker = "ray start --address='"
    for line in log_path.read_text(errors="replace").splitlines():
        if marker in line:
            return line.split(marker, 1)[1].split("'", 1)[0]
    return f"{_url_host(host)}:{port}"


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def _dashboard_version(address: str, headers: Mapping[str, str]) -> Optional[str]:
    request = urllib.request.Request(f"{address}/api/version", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=3) as response:
            return json.loads(response.read()).get("ray_version")
    except (OSError, ValueError, urllib.error.URLError):
        return None


def _stop_process_group(pid: int, grace: float) -> bool:
    """SIGTERM the head (it drains and stops its own processes), then SIGKILL what is left of its group."""
    import psutil

    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        psutil.Process(pid).wait(timeout=grace)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if not _group_alive(pid):
            return True
        time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # killpg(…, 0) also succeeds for zombies waiting to be reaped; count only live members.
    import psutil

    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.info["pid"]) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return False


def cluster_down(*, environ: Mapping[str, str] = os.environ, grace: float = 45.0) -> str:
    """Stop the local cluster ``cluster up`` started (and nothing else); a message saying what happened."""
    state = read_state(environ)
    path = state_dir(environ) / STATE_FILE
    if state is None:
        return "no local cluster is recorded; nothing to stop"
    if not _is_our_head(state):
        path.unlink(missing_ok=True)
        return f"the local cluster at {state.address} was not running (pid {state.pid}); removed its record"
    clean = _stop_process_group(state.pid, grace)
    path.unlink(missing_ok=True)
    how = "stopped" if clean else "killed (it did not stop within the grace period)"
    return f"local cluster at {state.address} {how}"


@dataclass(frozen=True)
class Listener:
    """A TCP port one of the cluster's processes listens on."""

    pid: int
    process: str
    address: str
    port: int

    @property
    def loopback(self) -> bool:
        """Reachable from this machine only. An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is what a dual-stack
        gRPC server bound to 127.0.0.1 shows."""
        ip = ipaddress.ip_address(self.address.split("%", 1)[0])
        mapped = getattr(ip, "ipv4_mapped", None)
        return (mapped or ip).is_loopback

    @property
    def every_interface(self) -> bool:
        return ipaddress.ip_address(self.address.split("%", 1)[0]).is_unspecified

    @property
    def endpoint(self) -> str:
        return f"{_url_host(self.address)}:{self.port}"


def cluster_processes(head_pid: int) -> list:
    """The head and every process of its cluster: its descendants, and what else lives in its session (``cluster
    up`` starts the head as a session leader; Ray's daemons stay in that session even when re-parented)."""
    import psutil

    try:
        head = psutil.Process(head_pid)
        found = {head.pid: head, **{p.pid: p for p in head.children(recursive=True)}}
    except psutil.NoSuchProcess:
        return []
    for proc in psutil.process_iter():
        try:
            if proc.pid not in found and os.getsid(proc.pid) == head_pid:
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    return sorted(found.values(), key=lambda p: p.pid)


def _process_label(proc) -> str:
    """``gcs_server``, ``ray::DashboardAgent``, or for a Python process its script or module (``monitor.py``)."""
    name = proc.name()
    if not name.startswith("python"):
        return name
    args = proc.cmdline()[1:]
    for i, arg in enumerate(args):
        if arg == "-m" and i + 1 < len(args):
            return args[i + 1]
        if arg.endswith(".py"):
            return Path(arg).name
    return name


def listening_ports(processes) -> list[Listener]:
    """Each TCP port the processes listen on, with the address it is bound to."""
    import psutil

    found = set()
    for proc in processes:
        try:
            connections = proc.net_connections(kind="inet")
            label = _process_label(proc)
        except psutil.Error:
            continue  # exited meanwhile
        for conn in connections:
            if conn.status == psutil.CONN_LISTEN:
                found.add(Listener(pid=proc.pid, process=label, address=conn.laddr.ip, port=conn.laddr.port))
    return sorted(found, key=lambda listener: (listener.port, listener.address))


def cluster_status(*, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    state = read_state(environ)
    if state is None:
        return {"running": False, "message": f"no local cluster; {HOW_TO_START}"}
    alive = _is_our_head(state)
    version = _dashboard_version(state.address, auth_headers(local=state, environ=environ)) if alive else None
    status = {"running": alive and version is not None, **dataclasses.asdict(state), "ray_version": version}
    if not alive:
        status["message"] = f"the local cluster recorded at {state.address} is not running (pid {state.pid} is gone)"
    elif version is None:
        status["message"] = f"the head (pid {state.pid}) is up but {state.address} does not answer"
    if alive:
        listeners = listening_ports(cluster_processes(state.pid))
        status["listening"] = [{**dataclasses.asdict(item), "endpoint": item.endpoint, "loopback": item.loopback,
                                "every_interface": item.every_interface} for item in listeners]
        status["loopback_only"] = all(item.loopback for item in listeners)
    return status
