"""Running pipelines on a Ray cluster: a local head (``cluster up``/``down``), the address a command talks to,
submission through Ray's Job Submission API with the project as the job's ``working_dir``, logs and stop.

Where the address comes from, in order: ``--address``, ``RAY_ADDRESS``, the local cluster ``cluster up``
recorded in its state file (``$DISTMERGE_CLUSTER_DIR``, default ``~/.distmerge/cluster``), else an error that
says how to start one.

A pipeline declares the pip packages it needs beyond distmerge's own dependencies as a module-level literal,
read without importing the script (importing would need those very packages)::

    REQUIREMENTS = ["datasets>=2.19", "evaluate"]

``submit`` puts them in the job's ``runtime_env["pip"]``; Ray installs them in a virtualenv on top of the
cluster's Python for that job only.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Optional

from distmerge.errors import DistmergeError


class ClusterError(DistmergeError):
    """No cluster to talk to, or the cluster refused or failed a request."""


class PipelineError(DistmergeError):
    """The pipeline script cannot be submitted as it is."""


STATE_DIR_ENV = "DISTMERGE_CLUSTER_DIR"
STATE_FILE = "cluster.json"
START_LOG = "ray-start.log"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
BLOCK_MARKER = "This command will now block forever"

# Never shipped to the cluster: environments, VCS data, caches, benchmark outputs, local run folders.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv*", "venv", "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".cache", "build", "dist", "benchmarks/results", "distmerge-demo", "/out",
    "*.safetensors", "*.bin", "*.pt",
)

HOW_TO_START = ("start one with `distmerge cluster up`, pass --address http://HOST:8265, or set RAY_ADDRESS")
HOW_TO_AUTH = ("set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head "
               "prints it)")
LOOPBACK = "127.0.0.1"
# Ray (2.60) swaps a loopback node IP for the machine's own address unless it believes it runs a single-machine
# cluster, which this variable (meant for macOS/Windows) makes it believe on Linux too. With a loopback node IP,
# GCS, raylet, workers and agents listen on loopback only (measured); without it they listen on every interface.
SINGLE_MACHINE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}

LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- local cluster


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


def default_token_path(environ: Mapping[str, str] = os.environ) -> Path:
    """Where Ray looks for the token when neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH is set."""
    home = environ.get("HOME")
    return (Path(home) if home else Path.home()) / ".ray" / "auth_token"


def token_file(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("RAY_AUTH_TOKEN_PATH") or default_token_path(environ)).expanduser()


def token_at_hand(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The token Ray's client would send in token mode (RAY_AUTH_TOKEN, the RAY_AUTH_TOKEN_PATH file,
    ~/.ray/auth_token, in Ray's order), or None when none holds one."""
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip()
    return _read_token(token_file(environ))


def make_token_private(path: Path) -> Optional[int]:
    """Make the token file readable by its owner only: whoever reads it can run code on the cluster. Returns the
    mode it had when that was wider (the caller says so), None when it was already private or is missing."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return None
    if not mode & 0o077:
        return None
    try:
        os.chmod(path, 0o600)
    except OSError as exc:
        raise ClusterError(f"token file '{path}' is readable by other users (mode {mode:04o}) and cannot be made "
                           f"private ({exc.strerror}): chmod 600 it, or point RAY_AUTH_TOKEN_PATH at a private "
                           "copy") from None
    LOG.warning("token file '%s' was readable by other users (mode %04o); made it 0600", path, mode)
    return mode


def ensure_token_file(environ: Mapping[str, str] = os.environ) -> Optional[Path]:
    """The token file a new head reads: created 0600 when missing (Ray itself would create it 0644 under the
    usual umask), made 0600 when it is wider. None when RAY_AUTH_TOKEN holds the token."""
    path = token_file(environ)
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        make_token_private(path)  # not used by this head, but it still lets others in
        return None
    if _read_token(path) is None:
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
        except OSError as exc:
            raise ClusterError(f"token file '{path}' cannot be created ({exc.strerror}); point RAY_AUTH_TOKEN_PATH "
                               "at a writable place or set RAY_AUTH_TOKEN") from None
    make_token_private(path)
    return path


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


# --------------------------------------------------------------------------------------------- address, auth


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


def _read_token(path: Path) -> Optional[str]:
    try:
        token = path.expanduser().read_text().strip()
    except OSError:
        return None
    return token or None


def auth_headers(*, local: Optional[ClusterState] = None, token_path: Optional[Path] = None,
                 environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The Authorization header for a token-auth cluster, from (in order) RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    the given token file, the local cluster's token file, ~/.ray/auth_token. None with RAY_AUTH_MODE=disabled.
    A head started with plain ``ray start --head`` uses ~/.ray/auth_token without being told, so a token at hand
    is sent even when RAY_AUTH_MODE is unset (Ray's own client would not, and the head would refuse)."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    token = environ.get("RAY_AUTH_TOKEN", "").strip() or None
    if token is None and environ.get("RAY_AUTH_TOKEN_PATH"):
        token = _read_token(Path(environ["RAY_AUTH_TOKEN_PATH"]))
    if token is None and token_path is not None:
        token = _read_token(token_path)
    if token is None and local is not None and local.token_path:
        token = _read_token(Path(local.token_path))
    if token is None:
        token = _read_token(default_token_path(environ))
    return {"Authorization": f"Bearer {token}"} if token else {}


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


# --------------------------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Pipeline:
    path: Path
    project_root: Path
    requirements: tuple[str, ...]

    @property
    def relative(self) -> str:
        return self.path.relative_to(self.project_root).as_posix()


def read_requirements(path: Path) -> tuple[str, ...]:
    """The script's module-level ``REQUIREMENTS = [...]`` (a literal list of strings), without importing it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise PipelineError(f"pipeline '{path}': syntax error at line {exc.lineno}: {exc.msg}") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        if not any(isinstance(t, ast.Name) and t.id == "REQUIREMENTS" for t in targets):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            value = None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise PipelineError(f"pipeline '{path}', line {node.lineno}: REQUIREMENTS must be a literal list of "
                                "pip requirement strings, e.g. REQUIREMENTS = [\"datasets>=2.19\"]")
        return tuple(v.strip() for v in value)
    return ()


def distmerge_package_dir() -> Path:
    return Path(__file__).resolve().parent


def find_project_root(pipeline: Path) -> Path:
    """The nearest folder above the pipeline holding a pyproject.toml (the project it belongs to); else its own
    folder."""
    for folder in pipeline.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return pipeline.parent


def load_pipeline(path: str | Path, project: str | Path | None = None) -> Pipeline:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise PipelineError(f"pipeline '{path}' does not exist")
    if path.suffix != ".py":
        raise PipelineError(f"pipeline '{path}' is not a Python script (.py)")
    root = Path(project).expanduser().resolve() if project else find_project_root(path)
    if not root.is_dir():
        raise PipelineError(f"--project: '{root}' is not a folder")
    if root not in path.parents:
        raise PipelineError(f"pipeline '{path}' is outside the project folder '{root}' that is shipped as the job's "
                            "working_dir; move it under the project or pass --project")
    return Pipeline(path=path, project_root=root, requirements=read_requirements(path))


def build_runtime_env(pipeline: Pipeline, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the project as working_dir (importable: Ray puts it first on PYTHONPATH), distmerge
    itself as a py_module when the project does not contain it, the pipeline's pip requirements."""
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env_vars.update(extra_env or {})
    runtime_env: dict[str, Any] = {"working_dir": str(pipeline.project_root),
                                   "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}
    package = distmerge_package_dir()
    if pipeline.project_root not in package.parents:
        runtime_env["py_modules"] = [str(package)]
    if pipeline.requirements:
        runtime_env["pip"] = list(pipeline.requirements)
    return runtime_env


def config_hash(pipeline: Pipeline, args: list[str], cwd: Path | None = None) -> str:
    """Identifies what ran: the pipeline's text, its arguments, and the contents of arguments naming files."""
    digest = hashlib.sha256()
    digest.update(pipeline.relative.encode())
    digest.update(pipeline.path.read_bytes())
    for arg in args:
        digest.update(b"\0" + arg.encode())
        candidate = Path(cwd or Path.cwd(), arg)
        if len(arg) < 4096 and candidate.is_file():
            digest.update(candidate.read_bytes())
    return digest.hexdigest()[:12]


def job_metadata(pipeline: Pipeline, args: list[str]) -> dict[str, str]:
    from distmerge import __version__

    return {"submitted_by": "distmerge", "distmerge_version": __version__, "pipeline": pipeline.relative,
            "args": shlex.join(args), "config_hash": config_hash(pipeline, args),
            "requirements": ", ".join(pipeline.requirements)}


def submission_id(pipeline: Pipeline) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in pipeline.path.stem.lower())
    return f"distmerge-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


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


# --------------------------------------------------------------------------------------------- jobs


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
