"""`distmerge cluster` / `submit` / `jobs` against a real Ray head started with `ray start --head` (loopback, token
auth, its own ports and temp dir), plus the pure parts (address resolution, runtime_env, requirements) and the
cluster definitions in cluster/."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from distmerge import jobs
from distmerge.cli import app

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ------------------------------------------------------------------------------------------------ a real head


def _free_ports(count: int) -> list[int]:
    sockets, ports = [], []
    for _ in range(count):
        sock = socket.socket()
        sock.bind(("", 0))  # Ray binds some ports on every interface: the port must be free on all of them
        sockets.append(sock)
        ports.append(sock.getsockname()[1])
    for sock in sockets:
        sock.close()
    return ports


def _cli_env(state: Path, token: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    env.update({jobs.STATE_DIR_ENV: str(state), "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"})
    return env


def _run(env: dict[str, str], *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distmerge.cli", *args], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@dataclass
class Head:
    env: dict[str, str]
    root: Path
    address: str


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    root = tmp_path_factory.mktemp("jobs")
    temp_dir = tempfile.mkdtemp(prefix="dm-ray-", dir="/tmp")  # short: Ray keeps unix sockets under it
    env = _cli_env(root / "state", root / "auth_token")
    # A token file others can read, as Ray itself writes it: `cluster up` must make it private.
    (root / "auth_token").write_text(os.urandom(32).hex())
    os.chmod(root / "auth_token", 0o644)
    port, dashboard, client, agent = _free_ports(4)
    try:
        up = _run(env, "cluster", "up", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                  "--dashboard-port", str(dashboard), "--client-port", str(client), "--agent-port", str(agent),
                  "--object-store-memory", "200MB", "--temp-dir", temp_dir, timeout=240)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"dashboard http://127.0.0.1:{dashboard}" in up.stdout and "token auth on" in up.stdout
        assert f"GCS 127.0.0.1:{port}," in up.stdout  # advertised on loopback, not the machine's address
        assert f"token file '{root / 'auth_token'}' was readable by other users (mode 0644); made it 0600" in up.stderr
        yield Head(env=env, root=root, address=f"http://127.0.0.1:{dashboard}")
    finally:
        down = _run(env, "cluster", "down", timeout=120)
        state = jobs.read_state(env)
        if state is not None and jobs._is_our_head(state):  # `down` failed: stop exactly that process group
            jobs._stop_process_group(state.pid, grace=30)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert down.returncode == 0, down.stdout + down.stderr


def _cli(head: Head, *args: str):
    """The same commands in this process (no interpreter start-up), with the head's environment."""
    return runner.invoke(app, list(args), env={**head.env, "RAY_ADDRESS": None})


def _job_id(stderr: str) -> str:
    match = re.search(r"submitted (\S+) to ", stderr)
    assert match, stderr
    return match.group(1)


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_head_listens_on_loopback_only(head):
    status = jobs.cluster_status(environ=head.env)
    assert status["running"], status
    listening = status["listening"]
    # Ray's own servers are among them: the GCS on --port, the dashboard, the agents, the Ray Client server.
    state = jobs.read_state(head.env)
    ports = {entry["port"] for entry in listening}
    assert state.dashboard_port in ports and int(state.gcs_address.rsplit(":", 1)[1]) in ports, listening
    processes = {entry["process"] for entry in listening}
    assert {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"} <= processes, listening
    exposed = [entry for entry in listening if not entry["loopback"]]
    assert not exposed and status["loopback_only"], exposed

    printed = _cli(head, "cluster", "status")
    assert printed.exit_code == 0, printed.output
    lines = printed.stdout.splitlines()
    # Workers come and go, their servers with them; Ray's own servers stay and are printed.
    ray_servers = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}
    for entry in (entry for entry in listening if entry["process"] in ray_servers):
        assert any(line.startswith(f"  listening {entry['endpoint']} (") and line.endswith(": loopback only")
                   for line in lines), (entry, printed.stdout)
    # The head may open a port between the two looks (a worker's or agent's server starting late): the
    # printed count is that of the printed lines, every one of them on loopback.
    printed_ports = [line for line in lines if line.startswith("  listening ")]
    assert all(line.endswith(": loopback only") for line in printed_ports), printed.stdout
    assert lines[-1] == f"{len(printed_ports)} listening port(s), all on loopback"


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_submit_quickstart_runs_on_the_head(head):
    token = (head.root / "auth_token").read_text().strip()
    assert token and oct((head.root / "auth_token").stat().st_mode & 0o777) == "0o600"
    status = _cli(head, "cluster", "status")
    assert status.exit_code == 0 and status.stdout.startswith(f"up: dashboard {head.address}"), status.output

    out = head.root / "quickstart"
    result = _run(head.env, "submit", "pipelines/quickstart.py", "--", "--preset", "tiny", "--out", str(out),
                  timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("quickstart: ties merge of 2 expert")]
    assert summary, result.stdout
    assert "2 worker(s)" in summary[0] and "generated '" in summary[0]
    job_id = _job_id(result.stderr)
    assert f"job {job_id} SUCCEEDED" in result.stderr
    index = json.loads((out / "merged-ties" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] and (out / "merged-ties" / "config.json").exists()
    assert (out / "merged-ties" / "distmerge.yaml").exists()

    listing = _cli(head, "jobs", "list")
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "SUCCEEDED" in row and "pipelines/quickstart.py" in row
    logs = _cli(head, "jobs", "logs", job_id)
    assert logs.exit_code == 0 and summary[0] in logs.stdout

    # Without the token the head refuses: token auth is really on.
    refused = runner.invoke(app, ["jobs", "list", "--address", head.address],
                            env={**head.env, "RAY_AUTH_TOKEN_PATH": None})
    assert refused.exit_code == 2 and "refused the request" in refused.output, refused.output
    from ray.job_submission import JobSubmissionClient

    with pytest.raises(Exception, match="(?i)auth"):
        JobSubmissionClient(head.address).list_jobs()
    info = JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {token}"}).get_job_info(job_id)
    assert info.metadata["pipeline"] == "pipelines/quickstart.py"
    assert info.metadata["args"] == f"--preset tiny --out {out}"
    assert re.fullmatch(r"[0-9a-f]{12}", info.metadata["config_hash"])


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_submit_nlg_fda_tiny(head):
    out = head.root / "nlg-fda"
    # One layer and few steps: the point is the pipeline running as a job end to end, not FDA's quality.
    result = _run(head.env, "submit", "pipelines/nlg_fda.py", "--", "--preset", "tiny", "--layers", "0",
                  "--steps", "5", "--epochs", "1", "--quiet", "--out", str(out), timeout=360)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = [line for line in result.stdout.splitlines() if line.startswith("nlg_fda: 2 anchor jobs")]
    assert summary and "1 layers adapted" in summary[0], result.stdout
    assert json.loads((out / "merged" / "model.safetensors.index.json").read_text())["weight_map"]
    assert (out / "fda.yaml").exists() and any((out / "anchors").iterdir())


def _project(tmp_path: Path, name: str, body: str) -> Path:
    project = tmp_path / "proj"
    (project / "pipelines").mkdir(parents=True, exist_ok=True)
    (project / "pyproject.toml").write_text('[project]\nname = "proj"\nversion = "0"\n')
    script = project / "pipelines" / name
    script.write_text(body)
    return script


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_failing_pipeline_fails_submit(head, tmp_path):
    script = _project(tmp_path, "boom.py", "print('stage 1 done', flush=True)\n"
                                            "raise RuntimeError('boom: anchors diverged at layer 3')\n")
    result = _run(head.env, "submit", str(script))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "stage 1 done" in result.stdout
    assert "RuntimeError: boom: anchors diverged at layer 3" in result.stdout
    assert f"job {_job_id(result.stderr)} FAILED" in result.stderr


@pytest.mark.ray
@pytest.mark.timeout(200)
def test_jobs_stop_stops_a_running_job(head, tmp_path):
    marker = tmp_path / "started"
    script = _project(tmp_path, "sleeper.py", "import sys, time\nopen(sys.argv[1], 'w').write('up')\n"
                                               "print('sleeping', flush=True)\ntime.sleep(600)\n")
    submitted = _cli(head, "submit", str(script), "--no-wait", "--", str(marker))
    assert submitted.exit_code == 0, submitted.output
    job_id = submitted.stdout.strip()
    assert job_id.startswith("distmerge-sleeper-")
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert time.monotonic() < deadline, _cli(head, "jobs", "logs", job_id).output
        time.sleep(0.5)
    stopped = _cli(head, "jobs", "stop", job_id)
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout.strip() == f"job {job_id} STOPPED"
    listing = _cli(head, "jobs", "list")
    assert listing.exit_code == 0, listing.output
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "STOPPED" in row and "pipelines/sleeper.py" in row
    again = _cli(head, "jobs", "stop", job_id)
    assert again.exit_code == 0 and "had already ended: STOPPED" in again.stdout
    followed = _cli(head, "jobs", "logs", job_id, "--follow")
    assert followed.exit_code == 1 and "sleeping" in followed.stdout and f"job {job_id} STOPPED" in followed.stderr
    missing = _cli(head, "jobs", "logs", "distmerge-no-such-job")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: job 'distmerge-no-such-job'")



_PARKED_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], _node_ip_address="127.0.0.1", log_to_driver=False)
print(json.dumps(sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == sys.argv[2])))
"""


def _parked(head: Head) -> list[str]:
    """The merge workers parked (or held) on the head, by name."""
    from distmerge.engine import parking

    env = {**head.env, "RAY_AUTH_MODE": "token", **jobs.SINGLE_MACHINE_ENV}
    done = subprocess.run([sys.executable, "-c", _PARKED_PROBE, jobs.read_state(head.env).gcs_address,
                           parking.NAMESPACE], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _wait_parked(head: Head, want, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        names = _parked(head)
        if want(names) or time.monotonic() > deadline:
            return names
        time.sleep(1)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_merge_processes_reuse_workers_parked_on_the_cluster(head, llama_family, tmp_path):
    """`distmerge merge --address` leaves its workers parked; the next process takes them (same bytes); they go
    when nobody claims them, when a merge of another shape comes, and when the merge holding them dies."""
    base, experts = llama_family
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(base), "method": "task_arithmetic",
                                      "parameters": {"lambda": 0.5}, "out_shard_size": "40KB",
                                      "models": [{"model": str(e), "name": f"e{i}"} for i, e in enumerate(experts)]}))
    gcs = jobs.read_state(head.env).gcs_address
    env = {**head.env, "DISTMERGE_WARM_WORKERS_S": "120"}

    def merge(out: str, workers: int, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config), "--out", str(tmp_path / out),
                               "--workers", str(workers), "--address", gcs, "--quiet"], env={**env, **extra},
                              cwd=REPO, capture_output=True, text=True, timeout=200)

    try:
        first = merge("first", 2)
        assert first.returncode == 0, first.stdout + first.stderr
        assert "by 2 worker(s)" in first.stdout, first.stdout
        parked = _parked(head)
        assert len(parked) == 2 and all(name.startswith("distmerge-merge-") for name in parked), parked

        second = merge("second", 2)
        assert second.returncode == 0, second.stdout + second.stderr
        assert "by 2 warm worker(s)" in second.stdout, second.stdout
        assert _parked(head) == parked  # the same actors, parked again
        for shard in sorted((tmp_path / "first").glob("*.safetensors")):
            assert shard.read_bytes() == (tmp_path / "second" / shard.name).read_bytes(), shard.name

        # Another shape: the 2-worker set gives its CPUs up; the new set goes unclaimed after its 3 seconds.
        third = merge("third", 1, DISTMERGE_WARM_WORKERS_S="3")
        assert third.returncode == 0, third.stdout + third.stderr
        assert "by 1 worker(s)" in third.stdout, third.stdout
        assert _wait_parked(head, lambda names: not names) == []

        # A merge that dies while it holds its workers: they go, they do not hold the cluster's CPUs.
        dead = merge("dead", 2, DISTMERGE_FAULT_INJECT="driver_exit_after_shards=1")
        assert dead.returncode != 0
        assert _wait_parked(head, lambda names: not names) == []
    finally:
        if _parked(head):  # leave the head's CPUs to the other tests
            merge("release", 1, DISTMERGE_WARM_WORKERS_S="0")


# ------------------------------------------------------------------------------------------------ no head


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    monkeypatch.setenv(jobs.STATE_DIR_ENV, str(tmp_path / "state"))
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_submit_without_a_cluster_says_how_to_start_one(no_cluster):
    result = runner.invoke(app, ["submit", str(REPO / "pipelines" / "quickstart.py"), "--", "--preset", "tiny"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: no Ray cluster to talk to: start one with `distmerge cluster up`, pass --address "
        "http://HOST:8265, or set RAY_ADDRESS"]


@pytest.mark.timeout(60)
def test_unreachable_address_is_one_line(no_cluster, monkeypatch):
    (port,) = _free_ports(1)
    result = runner.invoke(app, ["jobs", "list", "--address", f"127.0.0.1:{port}"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: no Ray cluster reachable at http://127.0.0.1:{port} "
                                                   "(from --address)"), result.output
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{port}")
    result = runner.invoke(app, ["submit", str(REPO / "pipelines" / "quickstart.py")])
    assert result.exit_code == 2 and "(from RAY_ADDRESS)" in result.output


def test_address_precedence_and_refusals(tmp_path):
    local = jobs.ClusterState(address="http://127.0.0.1:9999", gcs_address="127.0.0.1:6380", pid=1, num_cpus=2,
                              num_gpus=0, dashboard_port=9999, token_path=None, log_path="x", temp_dir=None,
                              python=sys.executable, started_at=0.0)
    env = {jobs.STATE_DIR_ENV: str(tmp_path), "RAY_ADDRESS": "http://10.1.2.3:8265"}
    assert jobs.resolve_address("head:8265", env, lambda e: local) == jobs.Target("http://head:8265", "--address")
    assert jobs.resolve_address(None, env, lambda e: local).source == "RAY_ADDRESS"
    target = jobs.resolve_address(None, {jobs.STATE_DIR_ENV: str(tmp_path)}, lambda e: local)
    assert target.address == local.address and target.local is local
    with pytest.raises(jobs.ClusterError, match="Ray Client address"):
        jobs.resolve_address("ray://head:10001", env)
    with pytest.raises(jobs.ClusterError, match="GCS port; .* use http://head:8265"):
        jobs.resolve_address("head:6379", env)
    # A recorded cluster whose head is gone is reported as such.
    jobs._write_state(local, {jobs.STATE_DIR_ENV: str(tmp_path)})
    with pytest.raises(jobs.ClusterError, match="recorded at http://127.0.0.1:9999 is not running"):
        jobs.resolve_address(None, {jobs.STATE_DIR_ENV: str(tmp_path)}, lambda e: None)


def test_auth_headers_sources(tmp_path):
    token_file = tmp_path / "tok"
    token_file.write_text("from-file\n")
    assert jobs.auth_headers(environ={"RAY_AUTH_TOKEN": "t1"}) == {"Authorization": "Bearer t1"}
    assert jobs.auth_headers(environ={"RAY_AUTH_TOKEN_PATH": str(token_file)}) == {
        "Authorization": "Bearer from-file"}
    local = jobs.ClusterState(address="http://127.0.0.1:1", gcs_address="", pid=1, num_cpus=1, num_gpus=0,
                              dashboard_port=1, token_path=str(token_file), log_path="", temp_dir=None, python="",
                              started_at=0)
    assert jobs.auth_headers(local=local, environ={}) == {"Authorization": "Bearer from-file"}
    # A cluster found through --address/RAY_ADDRESS with no token asked for gets no header.
    assert jobs.auth_headers(environ={"HOME": str(tmp_path)}) == {}


def test_cluster_spec_validation():
    with pytest.raises(jobs.ClusterError, match="ports must differ"):
        jobs.LocalClusterSpec(num_cpus=2, port=8265).validate()
    with pytest.raises(jobs.ClusterError, match="--temp-dir: .* too long"):
        jobs.LocalClusterSpec(num_cpus=2, temp_dir="/tmp/" + "x" * 80).validate()
    command = jobs.ray_start_command(jobs.LocalClusterSpec(num_cpus=3, num_gpus=1), python="/venv/bin/python")
    assert command[:5] == ["/venv/bin/python", "-m", "ray.scripts.scripts", "start", "--head"]
    for flag in ("--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--num-cpus=3",
                 "--num-gpus=1", "--disable-usage-stats"):
        assert flag in command
    env = jobs.head_environment({"PATH": "/usr/bin", "RAY_ADDRESS": "x"}, Path("/t/tok"), "/venv/bin/python")
    assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == "/t/tok"
    assert env["PATH"].startswith("/venv/bin" + os.pathsep) and "RAY_ADDRESS" not in env


def test_pipeline_requirements_and_runtime_env(tmp_path):
    script = _project(tmp_path, "eval.py", 'REQUIREMENTS = ["datasets>=2.19", "evaluate"]\nimport datasets\n')
    pipeline = jobs.load_pipeline(script)
    assert pipeline.project_root == tmp_path / "proj" and pipeline.relative == "pipelines/eval.py"
    assert pipeline.requirements == ("datasets>=2.19", "evaluate")
    env = jobs.build_runtime_env(pipeline)
    assert env["working_dir"] == str(tmp_path / "proj") and env["pip"] == ["datasets>=2.19", "evaluate"]
    # The project does not contain distmerge, so distmerge travels as a py_module.
    assert env["py_modules"] == [str(jobs.distmerge_package_dir())]

    quickstart = jobs.load_pipeline(REPO / "pipelines" / "quickstart.py")
    env = jobs.build_runtime_env(quickstart)
    assert quickstart.project_root == REPO and "pip" not in env and "py_modules" not in env

    # The excludes keep environments, VCS data and results out of the upload (Ray's own matcher).
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(tmp_path, env["excludes"])
    for shipped in ("distmerge/jobs/client.py", "pipelines/quickstart.py", "pyproject.toml", "benchmarks/common.py"):
        assert not excluded(tmp_path / shipped), shipped
    for dropped in (".venv", ".venv-mergekit", ".git", "benchmarks/results", "distmerge/__pycache__",
                    "distmerge.egg-info", "out", "models/base/model.safetensors"):
        assert excluded(tmp_path / dropped), dropped

    bad = _project(tmp_path, "bad.py", "REQUIREMENTS = ['ok', 3]\n")
    with pytest.raises(jobs.PipelineError, match=r"bad.py', line 1: REQUIREMENTS must be a literal list"):
        jobs.load_pipeline(bad)
    computed = _project(tmp_path, "computed.py", "REQUIREMENTS = sorted(['a'])\n")
    with pytest.raises(jobs.PipelineError, match="literal list"):
        jobs.load_pipeline(computed)
    with pytest.raises(jobs.PipelineError, match="does not exist"):
        jobs.load_pipeline(tmp_path / "nope.py")
    with pytest.raises(jobs.PipelineError, match="outside the project folder"):
        jobs.load_pipeline(script, project=REPO)


def test_config_hash_follows_args_and_files(tmp_path):
    script = _project(tmp_path, "p.py", "print(1)\n")
    pipeline = jobs.load_pipeline(script)
    config = tmp_path / "merge.yaml"
    config.write_text("method: ties\n")
    first = jobs.config_hash(pipeline, ["--config", str(config)])
    assert first == jobs.config_hash(pipeline, ["--config", str(config)])
    assert first != jobs.config_hash(pipeline, ["--config", str(config), "--workers", "2"])
    config.write_text("method: dare\n")
    assert first != jobs.config_hash(pipeline, ["--config", str(config)])


def _third_party_imports(path: Path) -> set[str]:
    """Top-level modules the script imports (anywhere in it) that are neither the standard library nor
    distmerge."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    siblings = {p.stem for p in path.parent.glob("*.py")}  # a pipeline may reuse another's code (shipped with it)
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("distmerge", "__future__")
            and n not in siblings}


def _distribution_names(requirements) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(r).name) for r in requirements}


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "pipelines").glob("*.py")))
def test_pipelines_have_help_and_declare_requirements(script):
    import importlib.metadata

    from packaging.utils import canonicalize_name

    path = REPO / "pipelines" / script
    result = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--preset" in result.stdout and "--out" in result.stdout, result.stderr
    assert re.search(r"^REQUIREMENTS\b", path.read_text(), re.MULTILINE), f"{script} declares no REQUIREMENTS"
    # Whatever the script imports must reach the job: from distmerge's own dependencies (extras do not count:
    # the cluster installs distmerge without them) or from the REQUIREMENTS that submit puts in runtime_env.
    core = [r for r in importlib.metadata.requires("distmerge") if "extra ==" not in r]
    shipped = _distribution_names(core) | _distribution_names(jobs.read_requirements(path))
    providers = importlib.metadata.packages_distributions()
    for module in sorted(_third_party_imports(path)):
        owners = {canonicalize_name(d) for d in providers.get(module, [module])}
        assert owners & shipped, f"{script} imports '{module}' ({', '.join(sorted(owners))}), which neither " \
                                 "distmerge's dependencies nor its REQUIREMENTS provide"


# ------------------------------------------------------------------------------------------------ cluster/


def test_cluster_launcher_yaml_is_valid():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    raw = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    validate_config(fillout_defaults(raw))  # Ray's own check: jsonschema ray-schema.json + its extra rules
    import jsonschema

    broken = yaml.safe_load((REPO / "cluster" / "gpu-cluster.yaml").read_text())
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5  # the schema wants whole units
    with pytest.raises(jsonschema.ValidationError):
        validate_config(fillout_defaults(broken))
    types = raw["available_node_types"]
    head, workers = types[raw["head_node_type"]], [t for n, t in types.items() if n != raw["head_node_type"]]
    assert raw["provider"]["type"] == "aws" and raw["provider"]["use_internal_ips"] is True
    assert workers and all(t["resources"].get("GPU", 0) >= 1 for t in workers)
    assert max(t["max_workers"] for t in workers) <= raw["max_workers"]
    start = " ".join(raw["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
    assert "RAY_AUTH_MODE=token" in " ".join(raw["worker_start_ray_commands"])
    setup = " ".join(raw["setup_commands"])
    assert "torch==" in setup and "pip install" in setup and "-e" in setup
    assert "~/.ray/auth_token" in raw["file_mounts"]
    assert head["resources"].get("GPU", 0) == 0


def _check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers, where
    for container in containers:
        assert container["name"] and container["image"], where
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert "RAY_ADDRESS" not in env, where
    return containers


def _check_raycluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    assert spec["authOptions"]["mode"] == "token", where
    headgroup = spec["headGroupSpec"]
    assert all(isinstance(v, str) for v in headgroup["rayStartParams"].values()), f"{where}: strings only"
    assert headgroup["rayStartParams"].get("num-gpus", "0") == "0"
    _check_pod_template(headgroup["template"], where)
    assert spec["workerGroupSpecs"], where
    for group in spec["workerGroupSpecs"]:
        assert group["groupName"], where
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], where
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: strings only"
        (container,) = _check_pod_template(group["template"], where)
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, where


def test_kuberay_manifests_carry_required_fields():
    folder = REPO / "cluster" / "kuberay"
    cluster = yaml.safe_load((folder / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster" and cluster["metadata"]["name"]
    _check_raycluster_spec(cluster["spec"], "raycluster.yaml")

    rayjob = yaml.safe_load((folder / "rayjob-nlg-fda.yaml").read_text())
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob" and rayjob["metadata"]["name"]
    spec = rayjob["spec"]
    assert spec["entrypoint"].startswith("python pipelines/nlg_fda.py")
    # K8sJobMode: a submitter pod inside the cluster posts the job to the head's dashboard through the head
    # Service, so the dashboard listens on the pod network and the Service stays ClusterIP (nothing outside).
    assert spec["submissionMode"] == "K8sJobMode"
    head_group = spec["rayClusterSpec"]["headGroupSpec"]
    assert head_group["serviceType"] == "ClusterIP"
    assert head_group["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (head_container,) = head_group["template"]["spec"]["containers"]
    assert 8265 in [port["containerPort"] for port in head_container["ports"]]
    assert isinstance(spec["shutdownAfterJobFinishes"], bool)
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]
    assert all(isinstance(v, str) for v in (spec.get("metadata") or {}).values())
    _check_raycluster_spec(spec["rayClusterSpec"], "rayjob-nlg-fda.yaml")
