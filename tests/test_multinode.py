"""Two real Ray nodes on this machine (a head and a worker node with a custom resource, loopback only): merge
actors land on both and the merged model equals a single-node run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from conftest import merge_config
from distmerge import merge
from test_faults import model_files

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture(scope="module")
def two_node_cluster():
    """``ray start --block`` keeps each node's processes tied to a child we can stop, so no global ``ray stop``."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="dmr-", dir="/tmp")  # short: Ray's unix socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--object-store-memory=100000000",
              "--memory=2000000000"]
    head = subprocess.Popen([_ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={temp_dir}", *common],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    nodes = [head]
    address = f"127.0.0.1:{port}"
    try:
        _wait_nodes(address, env, 1, nodes)
        nodes.append(subprocess.Popen([_ray_bin(), "start", f"--address={address}", "--num-cpus=1",
                                       '--resources={"node_b": 1}', *common], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True))
        _wait_nodes(address, env, 2, nodes)
        yield address, env
    finally:
        for node in reversed(nodes):
            node.terminate()
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_nodes(address: str, env: dict, count: int, nodes: list, timeout: float = 300) -> None:
    """Probe until ``count`` nodes are alive. On loaded cores a probe can outlast its own limit while the head
    is still coming up: that is one more try, not a failure; a node process that exits is one."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(1 for n in ray.nodes() if n['Alive']))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        exited = [node.args[:3] for node in nodes if node.poll() is not None]
        if exited:
            raise AssertionError(f"a test cluster node exited while starting: {exited}")
        try:
            done = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                                  timeout=90)
        except subprocess.TimeoutExpired:
            continue
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise AssertionError(f"the test cluster at {address} did not reach {count} node(s)")


@pytest.mark.usefixtures("ray_cluster")
def test_merge_spreads_over_two_nodes_and_matches_single_node(two_node_cluster, llama_family, tmp_path):
    address, env = two_node_cluster
    base, experts = llama_family
    config = merge_config(base, experts, "ties", density=0.3, trim_scope="global")
    single = tmp_path / "single"
    merge(config, single, workers=2, progress=False)  # the test session's one-node cluster

    config_path = tmp_path / "merge.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "two-nodes"
    done = subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config_path), "--out", str(out),
                           "--workers", "2", "--placement", "strict_spread", "--address", address, "--quiet"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    card = (out / "README.md").read_text()
    run = yaml.safe_load(card.split("## Run")[1].split("```yaml")[1].split("```")[0])
    nodes = {worker["node"] for worker in run["per_worker"]}
    assert len(nodes) == 2, run["per_worker"]
    assert model_files(out) == model_files(single)
