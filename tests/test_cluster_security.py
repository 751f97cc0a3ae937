"""The cluster's doors: a private token file, Ray's ports on loopback, a token sent where a head wants one (and
one clear line where none is at hand), and an embedded Ray that does not outlive its killed driver.

Each Ray here runs with HOME in a temp dir, so the real ~/.ray is never touched, and is stopped by its own
handle (its process group, or the driver that owns it), never by ``ray stop``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from distmerge import jobs
from distmerge.engine import ray_session
from test_jobs import _free_ports

REPO = Path(__file__).resolve().parents[1]
AUTH_VARS = ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE",
             "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update({"HOME": str(home), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", **extra})
    return env


def _write_token(path: Path, mode: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    token = os.urandom(32).hex()
    path.write_text(token)
    os.chmod(path, mode)
    return token


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def _wait_until_gone(processes: list[psutil.Process], timeout_s: float) -> list[str]:
    """Poll (bounded) until none of the processes runs; the ones still running at the end."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = []
        for proc in processes:
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(f"{proc.pid} {proc.name()}")
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


# ------------------------------------------------------------------------------------------------ pure parts


def test_token_file_is_created_private_and_widened_ones_are_fixed(tmp_path, caplog):
    home = tmp_path / "home"
    created = jobs.ensure_token_file({"HOME": str(home)})
    assert created == home / ".ray" / "auth_token" and _mode(created) == 0o600 and len(created.read_text()) == 64

    shared = tmp_path / "shared_token"
    token = _write_token(shared, 0o644)
    with caplog.at_level(logging.WARNING, logger="distmerge.jobs"):
        assert jobs.ensure_token_file({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(shared)}) == shared
    assert _mode(shared) == 0o600 and shared.read_text() == token  # fixed, not replaced
    assert [r.getMessage() for r in caplog.records] == [
        f"token file '{shared}' was readable by other users (mode 0644); made it 0600"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distmerge.jobs"):
        jobs.ensure_token_file({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(shared)})
    assert not caplog.records  # said only when something was fixed

    blocked = tmp_path / "file"
    blocked.write_text("")
    with pytest.raises(jobs.ClusterError, match=f"token file '{blocked}/tok' cannot be created"):
        jobs.ensure_token_file({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(blocked / "tok")})


def test_token_at_hand_follows_rays_order(tmp_path):
    home = tmp_path / "home"
    assert jobs.token_at_hand({"HOME": str(home)}) is None
    _write_token(home / ".ray" / "auth_token", 0o600)
    from_home = (home / ".ray" / "auth_token").read_text()
    assert jobs.token_at_hand({"HOME": str(home)}) == from_home
    other = tmp_path / "other"
    other.write_text("from-path\n")
    assert jobs.token_at_hand({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(other)}) == "from-path"
    assert jobs.token_at_hand({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(other), "RAY_AUTH_TOKEN": "t"}) == "t"
    # The job client sends it as well, unless token auth is switched off.
    assert jobs.auth_headers(environ={"HOME": str(home)}) == {"Authorization": f"Bearer {from_home}"}
    assert jobs.auth_headers(environ={"HOME": str(home), "RAY_AUTH_MODE": "disabled"}) == {}


@pytest.mark.parametrize("address, loopback", [("127.0.0.1", True), ("::ffff:127.0.0.1", True), ("::1", True),
                                               ("0.0.0.0", False), ("::", False), ("192.0.2.2", False)])
def test_listener_loopback(address, loopback):
    listener = jobs.Listener(pid=1, process="gcs_server", address=address, port=6379)
    assert listener.loopback is loopback
    assert listener.every_interface is (address in ("0.0.0.0", "::"))


def test_head_binding_settings():
    loopback = jobs.LocalClusterSpec(num_cpus=1)
    command = jobs.ray_start_command(loopback, python="/venv/bin/python")
    assert "--node-ip-address=127.0.0.1" in command and "--dashboard-host=127.0.0.1" in command
    env = jobs.head_environment({"PATH": "/usr/bin"}, None, "/venv/bin/python")
    assert env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"  # else Ray swaps 127.0.0.1 for the machine's address
    private = jobs.LocalClusterSpec(num_cpus=1, host="10.0.0.5")
    private.validate()
    assert "--node-ip-address=10.0.0.5" in jobs.ray_start_command(private)
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in jobs.head_environment({}, None, "python", host="10.0.0.5")
    for bad in ("0.0.0.0", "localhost", "::"):
        with pytest.raises(jobs.ClusterError, match="--host"):
            jobs.LocalClusterSpec(num_cpus=1, host=bad).validate()


def test_gcs_endpoint():
    assert ray_session.gcs_endpoint("127.0.0.1:6379") == ("127.0.0.1", 6379)
    assert ray_session.gcs_endpoint("[::1]:6379") == ("::1", 6379)
    for other in ("auto", "local", "ray://head:10001", "http://head:8265"):
        assert ray_session.gcs_endpoint(other) is None


# ------------------------------------------------------------------------------------------------ embedded Ray

EMBEDDED_DRIVER = """
import json, os, sys, time
import psutil
from distmerge import jobs
from distmerge.engine.ray_session import ray_session
with ray_session(num_cpus=1):
    me = psutil.Process()
    # Ray's agents come up a moment after ray.init returns; wait (bounded) until the raylet has both.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        names = [p.name() for p in me.children(recursive=True)]
        if "ray::DashboardAgent" in names and "ray::RuntimeEnvAgent" in names:
            break
        time.sleep(0.5)
    time.sleep(2)
    processes = [me] + me.children(recursive=True)
    listening = [[l.process, l.endpoint, l.loopback] for l in jobs.listening_ports(processes)]
    print(json.dumps({"pids": [p.pid for p in processes], "listening": listening}), flush=True)
    time.sleep(600)
"""


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_embedded_ray_is_private_and_does_not_outlive_a_killed_driver(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="dm-sec-", dir="/tmp")  # short: Ray keeps unix sockets under it
    driver = subprocess.Popen([sys.executable, "-c", EMBEDDED_DRIVER], env=_env(home, RAY_TMPDIR=ray_tmp),
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        line = driver.stdout.readline()
        assert line, driver.stderr.read()
        report = json.loads(line)
        processes = [psutil.Process(pid) for pid in report["pids"][1:] if psutil.pid_exists(pid)]
        names = {p.name() for p in processes}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= names, names

        # Ray created no world-readable token: distmerge made it first, 0600.
        token = home / ".ray" / "auth_token"
        assert _mode(token) == 0o600 and token.read_text().strip()
        # Every port of every process of this Ray, the driver's own included, is on loopback.
        ports = {process for process, _, _ in report["listening"]}
        assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= ports, report
        exposed = [entry for entry in report["listening"] if not entry[2]]
        assert not exposed, exposed

        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
        left = _wait_until_gone(processes, timeout_s=30)
        assert not left, f"still running 30 s after the driver was killed: {left}"
    finally:
        for proc in processes:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        driver.stdout.close()
        driver.stderr.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ a plain head


def _start_plain_head(home: Path, temp_dir: str, port: int, others: list[int]) -> subprocess.Popen:
    """``ray start --head`` as a user types it (token auth on by itself: the token exists), in its own process
    group so that the test stops exactly this head."""
    dashboard, client, agent = others
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--temp-dir={temp_dir}", "--object-store-memory=200000000"]
    log = open(Path(temp_dir) / "start.log", "wb")
    head = subprocess.Popen(command, env=_env(home), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 180
    while jobs.BLOCK_MARKER not in (Path(temp_dir) / "start.log").read_text(errors="replace"):
        assert head.poll() is None, (Path(temp_dir) / "start.log").read_text(errors="replace")
        assert time.monotonic() < deadline, "the plain head did not come up"
        time.sleep(0.5)
    return head


@pytest.fixture
def plain_head(tmp_path):
    home = tmp_path / "home"
    token = _write_token(home / ".ray" / "auth_token", 0o600)
    temp_dir = tempfile.mkdtemp(prefix="dm-plain-", dir="/tmp")
    port, *others = _free_ports(4)
    head = _start_plain_head(home, temp_dir, port, others)
    try:
        yield home, token, f"127.0.0.1:{port}"
    finally:
        jobs._stop_process_group(head.pid, grace=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _merge_config(tmp_path: Path, family) -> Path:
    from conftest import merge_config

    base, experts = family
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump(merge_config(base, experts, "task_arithmetic", **{"lambda": 0.5})))
    return path


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_merge_against_a_plain_token_head(plain_head, tmp_path, llama_family):
    home, _, address = plain_head
    config = _merge_config(tmp_path, llama_family)

    # The token is at hand in ~/.ray/auth_token: it is sent, and the merge runs on that head.
    merged = subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "--out",
                             str(tmp_path / "out"), "--address", address, "--quiet", "--workers", "1"],
                            env=_env(home), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert merged.returncode == 0, merged.stdout + merged.stderr
    assert (tmp_path / "out" / "config.json").exists()
    assert "InvalidAuthToken" not in merged.stderr

    # No token at hand: one line that says what to set, and no retry storm before it.
    empty_home = tmp_path / "empty"
    empty_home.mkdir()
    refused = subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "--out",
                              str(tmp_path / "refused"), "--address", address, "--quiet"],
                             env=_env(empty_home), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: the Ray cluster at {address} wants a token and none is at hand: set RAY_AUTH_TOKEN "
                      "or RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head prints it)"]
    assert "Traceback" not in refused.stderr and "Failed to get cluster ID" not in refused.stderr, refused.stderr
    assert not (tmp_path / "refused").exists()

    # A wrong token is named as such.
    wrong = subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "--out",
                            str(tmp_path / "wrong"), "--address", address, "--quiet"],
                           env=_env(empty_home, RAY_AUTH_TOKEN="0" * 64), cwd=REPO, capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "refused the token at hand" in wrong.stderr, wrong.stderr


@pytest.mark.timeout(60)
def test_nothing_listening_is_one_line(tmp_path):
    (port,) = _free_ports(1)
    result = subprocess.run([sys.executable, "-c", "from distmerge.engine.ray_session import ray_session\n"
                             f"with ray_session('127.0.0.1:{port}'): pass"],
                            env=_env(tmp_path), cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert f"DistmergeError: no Ray cluster reachable at 127.0.0.1:{port}: Connection refused" in result.stderr
