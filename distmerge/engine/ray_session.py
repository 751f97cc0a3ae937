"""Connecting to Ray: an embedded local instance by default, or the cluster named by --address/RAY_ADDRESS.

The embedded instance is this machine's only: its node IP is loopback, so every Ray process listens on
127.0.0.1; its token file is private; and a watchdog stops what Ray leaves running when the driver is killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray

from distmerge import jobs
from distmerge.engine import ray_watchdog
from distmerge.errors import DistmergeError

CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Session:
    """What a workload may know of the session it runs in."""

    borrowed: bool  # Ray was running before this workload and keeps running after it
    outermost: bool  # no other distmerge workload of this process encloses this one
    on_cluster: bool = False  # this process connected to a cluster that outlives it (--address, RAY_ADDRESS)


_active_workloads = 0  # distmerge workloads of this process inside a ray_session now


@contextlib.contextmanager
def ray_session(address: str | None = None, num_cpus: int | None = None, *,
                keeps_warm_workers: bool = False) -> Iterator[Session]:
    """Use the running Ray session if there is one; otherwise connect to ``address`` (else RAY_ADDRESS), or start
    an embedded instance (no address, or ``local``) and stop it afterwards.

    Idle merge workers kept warm by an earlier merge hold their CPUs: any workload but a merge
    (``keeps_warm_workers``) releases them as it enters, so FDA, sweeps and evaluation never wait for them."""
    global _active_workloads
    if not keeps_warm_workers:
        from distmerge.engine.pool import release_warm_workers

        release_warm_workers()
    borrowed = ray.is_initialized()
    _active_workloads += 1
    watchdog = None
    on_cluster = False
    try:
        if not borrowed:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
            address = address or os.environ.get("RAY_ADDRESS")
            if address and address != "local":
                connect(address)
                on_cluster = True
                if not keeps_warm_workers:  # merge workers parked there by an earlier process
                    from distmerge.engine.pool import release_parked_workers

                    release_parked_workers()
            else:
                start_embedded(num_cpus or os.cpu_count() or 1)
                watchdog = Watchdog.start()
        try:
            yield Session(borrowed=borrowed, outermost=_active_workloads == 1, on_cluster=on_cluster)
        finally:
            if not borrowed:
                from distmerge.engine.pool import release_warm_workers

                release_warm_workers()
                ray.shutdown()
                if watchdog is not None:
                    watchdog.stop()
    finally:
        _active_workloads -= 1


# --------------------------------------------------------------------------------------------- embedded


def start_embedded(num_cpus: int) -> None:
    """This machine only: loopback node IP (every Ray process binds 127.0.0.1), dashboard on loopback, the token
    file made before Ray would make it (Ray writes it 0644)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "disabled":
        jobs.ensure_token_file(os.environ)
    else:
        jobs.make_token_private(jobs.token_file(os.environ))
    with _single_machine():
        ray.init(address="local", num_cpus=num_cpus, dashboard_host=jobs.LOOPBACK, include_dashboard=None,
                 _node_ip_address=jobs.LOOPBACK, log_to_driver=True)


@contextlib.contextmanager
def _single_machine() -> Iterator[None]:
    """Keep Ray from swapping the loopback node IP for the machine's address while the session starts (see
    jobs.SINGLE_MACHINE_ENV). Ray read the variable when it was imported, so its constant is set as well; both
    are put back afterwards, when the node's IP is settled, so a later connection to a cluster is unaffected."""
    from ray._private import ray_constants

    saved_env = {name: os.environ.get(name) for name in jobs.SINGLE_MACHINE_ENV}
    saved_flag = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(jobs.SINGLE_MACHINE_ENV)  # the processes Ray starts now inherit it
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Watchdog:
    """The driver's end of ray_watchdog.py: it stops the embedded Ray's processes if this driver dies without
    stopping them (see that module for why Ray's own fate-sharing is not enough)."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def start(cls) -> "Watchdog":
        # Its own session: a Ctrl-C to the driver's terminal must not reach it before the driver has cleaned up.
        process = subprocess.Popen([sys.executable, str(Path(ray_watchdog.__file__)), str(os.getpid())],
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   close_fds=True, start_new_session=True)
        return cls(process)

    def stop(self) -> None:
        """Ray is stopped: tell the watchdog to leave its processes be."""
        with contextlib.suppress(OSError):
            self.process.stdin.write(ray_watchdog.GOODBYE + b"\n")
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


# --------------------------------------------------------------------------------------------- a cluster


def connect(address: str, environ: Mapping[str, str] = os.environ) -> None:
    """``ray.init(address)`` that sends the token at hand and says in one line why a connection failed.

    Ray's client sends a token only with RAY_AUTH_MODE=token, while a head started with plain ``ray start
    --head`` turns token auth on by itself when ~/.ray/auth_token exists; without the mode the driver retries for
    20 s and raises a traceback. So a token at hand turns the mode on (unless RAY_AUTH_MODE says otherwise), and
    the GCS is asked once, before ``ray.init``, whether it accepts us.

    A loopback head that listens on loopback only (``distmerge cluster up``) is connected to as the single-machine
    cluster it is: otherwise Ray swaps 127.0.0.1 for this machine's address, where that head does not listen, and
    waits forever."""
    token = jobs.token_at_hand(environ)
    if token is not None and not environ.get("RAY_AUTH_MODE"):
        _enable_token_mode()
    endpoint = gcs_endpoint(address)
    if endpoint is not None:
        _check_gcs(address, endpoint, token_sent=token is not None and _token_mode())
    loopback = endpoint is not None and _single_machine_head(*endpoint)
    try:
        with _single_machine() if loopback else contextlib.nullcontext():
            ray.init(address=address, log_to_driver=True, **({"_node_ip_address": jobs.LOOPBACK} if loopback else {}))
    except ray.exceptions.AuthenticationError:
        raise DistmergeError(_auth_message(address, token is not None and _token_mode())) from None
    except ConnectionError as exc:
        raise DistmergeError(f"no Ray cluster reachable at {address}: {jobs._first_line(exc)}; start one (`ray start "
                             "--head`, `distmerge cluster up`) or fix --address/RAY_ADDRESS") from None


def _single_machine_head(host: str, port: int) -> bool:
    """A GCS on a loopback address that does not also answer on this machine's own address (a head started with
    ``ray start --node-ip-address=127.0.0.1`` listens on every interface and is joined the usual way)."""
    if not _is_loopback(host):
        return False
    from ray._private.services import node_ip_address_from_perspective

    try:
        own = node_ip_address_from_perspective()
    except Exception:  # noqa: BLE001 - no route out: this machine is all there is
        return True
    if _is_loopback(own):
        return True
    try:
        socket.create_connection((own, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError:
        return True
    return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _token_mode() -> bool:
    return os.environ.get("RAY_AUTH_MODE", "").lower() == "token"


def _enable_token_mode() -> None:
    """RAY_AUTH_MODE=token for this process and the workers it starts, and Ray's cached config re-read (Ray's own
    helper for this; it only logs a warning besides)."""
    from ray._private.authentication import authentication_token_setup

    authentication_token_setup._enable_token_auth()


def gcs_endpoint(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of a GCS address such as ``10.0.0.5:6379``; None for ``auto``, ``local``, ``ray://...``."""
    if "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        return None
    return host, int(port)


def _check_gcs(address: str, endpoint: tuple[str, int], token_sent: bool) -> None:
    """Fail in one line, at once, where ``ray.init`` would retry for 20 s: nothing listens, or the GCS refuses
    our token (or its absence)."""
    try:
        socket.create_connection(endpoint, timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise DistmergeError(f"no Ray cluster reachable at {address}: {exc.strerror or exc}; start one (`ray start "
                             "--head`, `distmerge cluster up`) or fix --address/RAY_ADDRESS") from None
    from ray._raylet import GcsClient

    try:
        with _native_stderr_silenced():  # Ray's C++ client logs its own line for the refusal we report
            GcsClient(address=f"{jobs._url_host(endpoint[0])}:{endpoint[1]}")
    except ray.exceptions.AuthenticationError:
        raise DistmergeError(_auth_message(address, token_sent)) from None
    except Exception:  # noqa: BLE001 - anything else: let ray.init try and report it
        return


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the length of one call (C++ logging bypasses sys.stderr)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _auth_message(address: str, token_sent: bool) -> str:
    reason = ("refused the token at hand (it is not this cluster's)" if token_sent
              else "wants a token and none is at hand")
    return f"the Ray cluster at {address} {reason}: {jobs.HOW_TO_AUTH}"


def cluster_cpus() -> float:
    return float(ray.cluster_resources().get("CPU", 1.0))


def cluster_gpus() -> float:
    return float(ray.cluster_resources().get("GPU", 0.0))


def get(refs):
    """ray.get that re-raises a user-facing error from a task or actor (bad input, bad parameter) as itself,
    without Ray's wrapping; anything else (a bug, a dead worker) propagates as Ray raised it."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        found = find_user_error(exc)
        if found is not None:
            raise found from None
        raise


# --------------------------------------------------------------------------------------------- user errors

_REMOTE_USER_ERROR = re.compile(r"distmerge\.errors\.(\w+): (.+)", re.DOTALL)


def find_user_error(exc: BaseException) -> DistmergeError | None:
    """The DistmergeError behind a Ray error: a task's cause, or, for an actor that died in ``__init__`` (Ray keeps
    only the text of that error), the last "distmerge.errors.X: message" of its traceback."""
    from distmerge import errors

    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DistmergeError):
            return current
        stack.extend([getattr(current, "cause", None), current.__cause__, current.__context__])
    text = str(exc)
    start = text.rfind("distmerge.errors.")
    match = _REMOTE_USER_ERROR.match(text, start) if start >= 0 else None
    if match:
        cls = getattr(errors, match.group(1), None)
        if isinstance(cls, type) and issubclass(cls, DistmergeError):
            return cls(match.group(2).strip().splitlines()[0])
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Ray wraps an actor's or a task's exception; a user mistake inside one surfaces as that mistake."""
    try:
        yield
    except DistmergeError:
        raise
    except Exception as exc:
        found = find_user_error(exc)
        if found is not None:
            raise type(found)(str(found)) from None
        raise
