"""Merge throughput of distmerge against the I/O floor, a minimal single-process loop and mergekit.

    python benchmarks/merge_throughput.py --models /tmp/ckpt-1b \
        --methods weight_average,task_arithmetic,ties_tensor,ties_global,dare_ties,emr --workers 1,2,4 \
        [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--out-root DIR] [--repeat 1] [--json results.json]

``--models`` is a family made by make_checkpoints.py (``base/`` and ``expert_*/``). Every figure comes from
this one run, on one local Ray started once before anything is timed, with a warm page cache: the inputs
are read once before any timing and nothing is ever dropped from the cache. Each output folder is deleted
after it is measured. With --repeat N every configuration runs N times and the fastest run is reported.

Baselines, measured in the same run:
  floor         read every input file from the page cache in 64 MiB blocks, plus write one model-size file
                and fsync it (timed separately and summed; per method, only the inputs that method reads);
  minimal loop  one process: per output shard (the input's grouping), per tensor, safe_open each model's
                shard and get_tensor, base + 0.5 * sum(tau) in float32, cast to bf16, save_file, fsync;
  mergekit      mergekit-yaml on the equivalent mergekit config, with `--async-write -j <cores>` ("best")
                and with no flags, when --mergekit is given.

Two ways distmerge is timed:
  in-process    ``distmerge.merge`` called in this process on its embedded Ray (Ray's start not counted); every
                merge starts its own actors;
  whole process ``distmerge merge --workers N --address <GCS>`` as a user runs it, against a local head started
                by ``distmerge cluster up`` before anything is timed: interpreter start, imports, connection,
                the merge, exit. Each configuration runs twice in a row: the first process finds no workers of
                its shape (cold: it starts actors), the second takes the ones the first parked (warm).

``--compute-dtype float32,bfloat16`` times both compute precisions, distmerge's ``dtype`` and mergekit's ``dtype``
alike (both write bf16).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    family_spec,
    files_bytes,
    fsync_path,
    machine_info,
    mib,
    model_folders,
    peak_rss_bytes,
    reset_peak_rss,
    shard_files,
    weight_map,
)

BLOCK = 64 << 20
TA_LAMBDA = 0.5

# method -> (distmerge method, parameters, reads the base)
METHODS = {
    "weight_average": ("weight_average", {}, False),
    "task_arithmetic": ("task_arithmetic", {"lambda": TA_LAMBDA}, True),
    "ties_tensor": ("ties", {"density": 0.2, "trim_scope": "tensor"}, True),
    "ties_global": ("ties", {"density": 0.2, "trim_scope": "global"}, True),
    "dare_ta": ("dare", {"drop_rate": 0.9, "then": "task_arithmetic", "lambda": TA_LAMBDA}, True),
    "dare_ties": ("dare", {"drop_rate": 0.9, "then": "ties", "density": 0.2, "trim_scope": "global"}, True),
    "breadcrumbs": ("breadcrumbs", {"density": 0.9, "gamma": 0.01}, True),
    "della": ("della", {"density": 0.7, "epsilon": 0.15}, True),
    "emr": ("emr", {}, True),
}
PHASES = ("floor", "minimal", "mergekit", "inprocess", "whole")  # the floor always runs: every ratio needs it
# method -> (mergekit merge_method, how close it is). mergekit has no global trim and no EMR.
MERGEKIT = {
    "weight_average": ("linear", "same"),
    "task_arithmetic": ("task_arithmetic", "same"),
    "ties_tensor": ("ties", "same"),
    "ties_global": ("ties", "nearest: mergekit trims per tensor"),
    "dare_ta": ("dare_linear", "same (mergekit rescales by 1/(1-p) too)"),
    "dare_ties": ("dare_ties", "nearest: mergekit keeps 10% by DARE, no magnitude trim after"),
    "breadcrumbs": ("breadcrumbs", "same cut (ties at the cut broken by index; convention mergekit: element for element)"),
    "della": ("della", "nearest: mergekit rescales to the L1 norm, distmerge by 1/p"),
}


# --- configs ------------------------------------------------------------------------------------------------

def distmerge_config(method: str, base: Path, experts: list[Path], out_shard_size: int,
                     compute_dtype: str = "float32") -> dict:
    name, params, reads_base = METHODS[method]
    config = {"method": name, "models": [{"model": str(e)} for e in experts], "parameters": dict(params),
              "out_shard_size": out_shard_size, "dtype": compute_dtype}
    if reads_base:
        config["base_model"] = str(base)
    return config


def mergekit_config(mk_method: str, base: Path, experts: list[Path], compute_dtype: str = "float32") -> dict:
    """Compute in ``compute_dtype`` and write bfloat16, as distmerge does on bf16 inputs."""
    params = {"linear": {"weight": 1.0}, "task_arithmetic": {"weight": TA_LAMBDA},
              "ties": {"weight": 1.0, "density": 0.2}, "dare_ties": {"weight": 1.0, "density": 0.1},
              "dare_linear": {"weight": TA_LAMBDA, "density": 0.1},
              "breadcrumbs": {"weight": 1.0, "density": 0.9, "gamma": 0.01},
              "della": {"weight": 1.0, "density": 0.7, "epsilon": 0.15}}[mk_method]
    config = {"merge_method": mk_method, "models": [{"model": str(e), "parameters": params} for e in experts],
              "dtype": compute_dtype, "out_dtype": "bfloat16"}
    if mk_method != "linear":
        config["base_model"] = str(base)
    return config


# --- baselines ----------------------------------------------------------------------------------------------

def read_file(path: Path, buffer: bytearray) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


def measure_floor(files: list[Path], write_bytes: int, out_root: Path) -> dict:
    buffer = bytearray(BLOCK)
    for path in files:  # warm the page cache
        read_file(path, buffer)
    reads = {}
    for path in files:
        began = time.perf_counter()
        read_file(path, buffer)
        reads[str(path)] = time.perf_counter() - began
    block = memoryview(os.urandom(BLOCK))
    target = out_root / "floor-write.bin"
    began = time.perf_counter()
    with open(target, "wb", buffering=0) as f:
        left = write_bytes
        while left > 0:
            left -= f.write(block[:min(left, BLOCK)])
        os.fsync(f.fileno())
    write_seconds = time.perf_counter() - began
    target.unlink()
    return {"read_seconds": reads, "write_seconds": write_seconds, "write_bytes": write_bytes}


def minimal_loop(base: str, experts: list[str], out: str) -> dict:
    """Task arithmetic the plainest way, in a process of its own (its memory is not the driver's)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    models = [Path(base), *map(Path, experts)]
    maps = [weight_map(m) for m in models]
    shards: dict[str, list[str]] = {}
    for name, filename in maps[0].items():
        shards.setdefault(filename, []).append(name)
    Path(out).mkdir(parents=True)
    began = time.perf_counter()
    for filename, names in sorted(shards.items()):
        merged = {}
        for name in names:
            values = []
            for model, wmap in zip(models, maps):
                with safe_open(str(model / wmap[name]), "pt") as handle:
                    values.append(handle.get_tensor(name).float())
            base_value = values[0]
            task_sum = sum(v - base_value for v in values[1:])
            merged[name] = (base_value + TA_LAMBDA * task_sum).to(torch.bfloat16)
        path = Path(out) / filename
        save_file(merged, str(path), metadata={"format": "pt"})
        fsync_path(path)
    return {"seconds": time.perf_counter() - began, "peak_rss_bytes": peak_rss_bytes()}


def run_mergekit(command: list[str], config_path: Path, out: Path, log: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    with open(log, "wb") as stream:
        began = time.perf_counter()
        proc = subprocess.Popen([*command[:1], str(config_path), str(out), *command[1:]], stdout=stream,
                                stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}), log {log}:\n{tail}")
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024}


def free_ports(count: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("", 0))  # Ray binds some ports on every interface: free on all of them
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


class LocalHead:
    """A head started by ``distmerge cluster up`` (loopback, token auth) in a state folder of its own."""

    def __init__(self, root: Path, cores: int):
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        self.env.update(DISTMERGE_CLUSTER_DIR=str(root / "state"), RAY_AUTH_TOKEN_PATH=str(root / "token"),
                        RAY_USAGE_STATS_ENABLED="0", DISTMERGE_WARM_WORKERS_S="120")
        self.temp_dir = tempfile.mkdtemp(prefix="dm-bench-", dir="/tmp")  # short: Ray's unix sockets live here
        port, dashboard, client, agent = free_ports(4)
        up = self.cli("cluster", "up", "--num-cpus", str(cores), "--num-gpus", "0", "--port", str(port),
                      "--dashboard-port", str(dashboard), "--client-port", str(client), "--agent-port", str(agent),
                      "--temp-dir", self.temp_dir)
        if up.returncode != 0:
            raise RuntimeError(f"cluster up failed:\n{up.stdout}{up.stderr}")
        self.gcs = f"127.0.0.1:{port}"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distmerge.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=600)

    def merge(self, config_path: Path, out: Path, workers: int) -> dict:
        """One ``distmerge merge`` process, timed from its start to its exit."""
        command = [sys.executable, "-m", "distmerge.cli", "merge", str(config_path), "--out", str(out), "--workers",
                   str(workers), "--address", self.gcs, "--quiet"]
        began = time.perf_counter()
        proc = subprocess.Popen(command, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = proc.communicate()
        seconds = time.perf_counter() - began
        if proc.returncode != 0:
            raise RuntimeError(f"distmerge merge failed ({proc.returncode}):\n{stdout}{stderr[-3000:]}")
        summary = stdout.strip().splitlines()[-1]
        return {"seconds": seconds, "warm": " warm worker(s) " in summary, "summary": summary}

    def down(self) -> None:
        self.cli("cluster", "down")
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def whole_process_rows(methods: list[str], worker_counts: list[int], dtypes: list[str], base: Path,
                       experts: list[Path], out_shard_size, out_root: Path, cores: int, floor_seconds,
                       input_bytes, on_row) -> None:
    log("whole process: starting a local head (`distmerge cluster up`), not timed")
    head = LocalHead(out_root, cores)
    try:
        for dtype in dtypes:
            for method in methods:
                config_path = out_root / f"whole-{method}-{dtype}.yaml"
                config_path.write_text(yaml.safe_dump(distmerge_config(method, base, experts, out_shard_size, dtype)))
                for workers in worker_counts:
                    for attempt in ("first", "second"):
                        log(f"whole process: distmerge merge {method} ({dtype}), {workers} worker(s), {attempt}")
                        out = out_root / f"whole-{method}-{dtype}-w{workers}"
                        run = head.merge(config_path, out, workers)
                        remove(out)
                        on_row({"kind": "whole_process", "label": f"{method} whole process "
                                f"({'warm' if run['warm'] else 'cold'} workers, {dtype})", "method": method,
                                "compute_dtype": dtype, "workers": workers, "warm_workers": run["warm"],
                                "input_bytes": input_bytes(method), "floor_seconds": floor_seconds(method), **run})
                config_path.unlink()
    finally:
        head.down()


# --- running ------------------------------------------------------------------------------------------------

def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def best_of(runs: list[dict]) -> dict:
    best = dict(min(runs, key=lambda r: r["seconds"]))
    best["all_seconds"] = [round(r["seconds"], 3) for r in runs]
    return best


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def versions(mergekit: str | None) -> dict:
    import importlib.metadata as md

    import ray
    import torch

    out = {"torch": torch.__version__, "ray": ray.__version__}
    for package in ("distmerge", "transformers", "safetensors"):
        out[package] = md.version(package)
    if mergekit:
        python = Path(mergekit).parent / "python"
        probe = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
                                "m.version('torch'), m.version('transformers'))"], capture_output=True, text=True)
        found = probe.stdout.split()
        out["mergekit"] = (f"mergekit {found[0]} (its venv: torch {found[1]}, transformers {found[2]})"
                           if len(found) == 3 else f"mergekit version unknown ({python})")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, required=True, help="a family made by make_checkpoints.py")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--mergekit", help="path of mergekit-yaml (in its own venv); mergekit runs only if given")
    parser.add_argument("--mergekit-methods", help="comma list of mergekit merge_methods to run (default: every "
                        "one the chosen methods map to)")
    parser.add_argument("--out-root", type=Path, help="where outputs go (deleted after each run); default: a "
                        "temporary folder beside --models")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--out-shard-size", help="distmerge's out_shard_size; default: the family's shard size")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--compute-dtype", default="float32", help="comma list of compute dtypes (float32, "
                        "bfloat16) for distmerge and mergekit alike")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    args = parser.parse_args()
    phases = set(args.phases.split(","))
    if phases - set(PHASES):
        parser.error(f"unknown phase(s) {sorted(phases - set(PHASES))}; choose from {', '.join(PHASES)}")
    dtypes = [d.strip() for d in args.compute_dtype.split(",") if d.strip()]

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    worker_counts = [int(w) for w in args.workers.split(",")]
    models_dir = args.models.expanduser().resolve()
    base, experts = model_folders(models_dir)
    spec = family_spec(models_dir) or {}
    out_shard_size = args.out_shard_size or spec.get("shard_bytes") or max(f.stat().st_size for f in shard_files(base))
    base_files = shard_files(base)
    expert_files = [f for e in experts for f in shard_files(e)]
    bytes_with_base = files_bytes(base_files + expert_files)
    bytes_experts = files_bytes(expert_files)
    model_bytes = files_bytes(base_files)

    created_root = args.out_root is None
    out_root = Path(tempfile.mkdtemp(prefix="merge-throughput-", dir=models_dir.parent)) if created_root \
        else args.out_root.expanduser().resolve()
    out_root.mkdir(parents=True, exist_ok=True)

    import ray

    import distmerge

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Every merge starts its own actors, as `distmerge merge` does: warm workers would carry one method's peak
    # memory into the next one's figures. DISTMERGE_WARM_WORKERS_S=10 measures merges in a loop instead.
    os.environ.setdefault("DISTMERGE_WARM_WORKERS_S", "0")
    cores = os.cpu_count() or 1
    ray_began = time.perf_counter()
    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray_seconds = time.perf_counter() - ray_began

    info = {"machine": machine_info(), "versions": versions(args.mergekit), "models": str(models_dir),
            "family": spec, "input_bytes": {"base": model_bytes, "experts": bytes_experts},
            "out_root": str(out_root), "out_shard_size": out_shard_size, "repeat": args.repeat,
            "ray_init_seconds": round(ray_seconds, 2), "cache": "warm (inputs read before timing; nothing dropped)"}
    rows: list[dict] = []

    def save_partial() -> None:  # a long run that is stopped still leaves what it measured
        if args.json:
            args.json.write_text(json.dumps({**info, "rows": rows, "partial": True}, indent=2, default=str) + "\n")

    try:
        log("floor: warming the page cache, then reading every input and writing one model-size file")
        floor = measure_floor(base_files + expert_files, model_bytes, out_root)
        read_all = sum(floor["read_seconds"].values())
        read_experts = sum(floor["read_seconds"][str(f)] for f in expert_files)

        def floor_seconds(reads_base: bool) -> float:
            return (read_all if reads_base else read_experts) + floor["write_seconds"]

        info["floor"] = {"read_all_seconds": read_all, "read_experts_seconds": read_experts,
                         "write_seconds": floor["write_seconds"], "write_bytes": model_bytes}
        rows.append({"kind": "floor", "label": "floor: read inputs + write 1 model", "workers": None,
                     "seconds": floor_seconds(True), "input_bytes": bytes_with_base,
                     "floor_seconds": floor_seconds(True)})

        log("minimal loop: task arithmetic in one process")
        runs = []
        for i in range(args.repeat if "minimal" in phases else 0):
            out = out_root / f"minimal-{i}"
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                runs.append(pool.submit(minimal_loop, str(base), [str(e) for e in experts], str(out)).result())
            remove(out)
        run = best_of(runs) if runs else None
        rows.extend([] if run is None else [{"kind": "minimal_loop", "label": "minimal loop (TA, 1 process)", "workers": 1,
                     "input_bytes": bytes_with_base, "floor_seconds": floor_seconds(True),
                     "worker_peak_rss_bytes": [run["peak_rss_bytes"]], **run}])

        mergekit_best: dict[tuple[str, str], float] = {}
        for dtype in (dtypes if args.mergekit and "mergekit" in phases else []):
            cores_flag = ["--async-write", "-j", str(cores)]
            wanted = set(args.mergekit_methods.split(",")) if args.mergekit_methods else None
            for mk_method in dict.fromkeys(MERGEKIT[m][0] for m in methods if m in MERGEKIT):
                if wanted is not None and mk_method not in wanted:
                    continue
                config_path = out_root / f"mergekit-{mk_method}.yaml"
                config_path.write_text(yaml.safe_dump(mergekit_config(mk_method, base, experts, dtype),
                                                      sort_keys=False))
                reads_base = mk_method != "linear"
                for flags, label in ((cores_flag, " ".join(cores_flag)), ([], "no flags")):
                    log(f"mergekit {mk_method} ({label}, {dtype})")
                    runs = []
                    for i in range(args.repeat):
                        out = out_root / f"mergekit-{mk_method}-{i}"
                        runs.append(run_mergekit([args.mergekit, *flags], config_path, out,
                                                 out_root / f"mergekit-{mk_method}.log"))
                        remove(out)
                    run = best_of(runs)
                    if flags:
                        mergekit_best[mk_method, dtype] = run["seconds"]
                    rows.append({"kind": "mergekit", "label": f"mergekit {mk_method} ({label}, {dtype})",
                                 "workers": None, "mergekit_method": mk_method, "flags": flags, "compute_dtype": dtype,
                                 "input_bytes": bytes_with_base if reads_base else bytes_experts,
                                 "floor_seconds": floor_seconds(reads_base),
                                 "mergekit_best_seconds": mergekit_best.get((mk_method, dtype)),
                                 "worker_peak_rss_bytes": [run["peak_rss_bytes"]], **run})
                (out_root / f"mergekit-{mk_method}.log").unlink(missing_ok=True)
                config_path.unlink()

        # Ray's first actors in a fresh session pay one-time costs (worker pool, module export): untimed warm-up.
        if "inprocess" in phases:
            log("distmerge warm-up (untimed): task_arithmetic, 1 worker")
            began = time.perf_counter()
            distmerge.merge(distmerge_config("task_arithmetic", base, experts, out_shard_size), out_root / "warmup",
                            workers=1, progress=False)
            info["warmup_seconds"] = round(time.perf_counter() - began, 2)
            remove(out_root / "warmup")

        ta_seconds: dict[tuple[int, str], float] = {}
        for dtype, method in ((d, m) for d in dtypes for m in methods if "inprocess" in phases):
            reads_base = METHODS[method][2]
            config = distmerge_config(method, base, experts, out_shard_size, dtype)
            for workers in worker_counts:
                log(f"distmerge {method} ({dtype}), {workers} worker(s)")
                runs = []
                for i in range(args.repeat):
                    out = out_root / f"distmerge-{method}-w{workers}-{i}"
                    reset_peak_rss()
                    began = time.perf_counter()
                    result = distmerge.merge(config, out, workers=workers, progress=False)
                    seconds = time.perf_counter() - began
                    runs.append({
                        "seconds": seconds, "driver_peak_rss_bytes": peak_rss_bytes(),
                        "worker_peak_rss_bytes": [r["peak_rss_bytes"] for r in result.worker_reports],
                        "worker_peak_anon_bytes": [r["peak_anon_bytes"] for r in result.worker_reports],
                        "worker_timings": [{k: round(v, 3) for k, v in r["timings"].items()}
                                           for r in result.worker_reports],
                        "actors": result.workers, "shards": result.shards, "bytes_read": result.bytes_read,
                        "bytes_written": result.bytes_written,
                    })
                    remove(out)
                run = best_of(runs)
                if method == "task_arithmetic":
                    ta_seconds[workers, dtype] = run["seconds"]
                mk = MERGEKIT.get(method)
                rows.append({"kind": "distmerge", "label": f"{method} ({dtype})", "method": method,
                             "compute_dtype": dtype, "workers": workers, "config": config,
                             "input_bytes": bytes_with_base if reads_base else bytes_experts,
                             "floor_seconds": floor_seconds(reads_base), "ta_seconds": ta_seconds.get((workers, dtype)),
                             "mergekit_method": mk and mk[0], "mergekit_equivalence": mk and mk[1],
                             "mergekit_best_seconds": mk and mergekit_best.get((mk[0], dtype)), **run})
                save_partial()
        ray.shutdown()

        if "whole" in phases:
            def add(row: dict) -> None:
                method, dtype = row["method"], row["compute_dtype"]
                mk = MERGEKIT.get(method)
                rows.append({**row, "mergekit_method": mk and mk[0], "mergekit_equivalence": mk and mk[1],
                             "mergekit_best_seconds": mk and mergekit_best.get((mk[0], dtype))})
                save_partial()

            whole_process_rows(methods, worker_counts, dtypes, base, experts, out_shard_size, out_root, cores,
                               lambda m: floor_seconds(METHODS[m][2]),
                               lambda m: bytes_with_base if METHODS[m][2] else bytes_experts, add)
            # x TA of a whole process: against task arithmetic's whole process of the same workers, dtype, warmth
            whole_ta = {(r["workers"], r["compute_dtype"], r["warm_workers"]): r["seconds"] for r in rows
                        if r["kind"] == "whole_process" and r["method"] == "task_arithmetic"}
            for row in (r for r in rows if r["kind"] == "whole_process"):
                row["ta_seconds"] = whole_ta.get((row["workers"], row["compute_dtype"], row["warm_workers"]))
    finally:
        ray.shutdown()
        if created_root:
            remove(out_root)

    for row in rows:
        row["input_gbps"] = row["input_bytes"] / row["seconds"] / 1e9
        row["x_floor"] = row["seconds"] / row["floor_seconds"]
        row["x_ta"] = row["seconds"] / row["ta_seconds"] if row.get("ta_seconds") else None
        mk_best = row.get("mergekit_best_seconds")
        row["x_mergekit_best"] = row["seconds"] / mk_best if mk_best else None
    print_report(info, rows)
    if args.json:
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")


def ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_report(info: dict, rows: list[dict]) -> None:
    m, v, spec = info["machine"], info["versions"], info["family"]
    print(f"# merge throughput, {m['date']}")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; {m['platform']}")
    print("versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if k != "mergekit")
          + (f"; {v['mergekit']}" if v.get("mergekit") else ""))
    size = spec.get("size", "?")
    print(f"models: {info['models']} ({size}: base + {spec.get('experts', '?')} experts, bf16, "
          f"{info['input_bytes']['base'] / 1e9:.3f} GB per model, {spec.get('shards', '?')} shards each); "
          f"distmerge out_shard_size {info['out_shard_size']} B")
    print(f"page cache: WARM for every run (inputs read once before timing, nothing dropped); best of "
          f"{info['repeat']}; Ray started once ({info['ray_init_seconds']}s, not counted); one untimed distmerge "
          f"warm-up ({info.get('warmup_seconds', '-')}s)")
    floor = info["floor"]
    print(f"floor: read all inputs {floor['read_all_seconds']:.3f}s (experts only {floor['read_experts_seconds']:.3f}s)"
          f" + write {floor['write_bytes'] / 1e9:.3f} GB with fsync {floor['write_seconds']:.3f}s")
    print("ratios: x floor = seconds / floor for the inputs the method reads; x TA = / distmerge task_arithmetic "
          "at the same workers; x mk = / mergekit best flags on the equivalent config")
    header = ["method", "workers", "seconds", "in GB/s", "x floor", "x TA", "x mk", "worker RSS MiB",
              "worker anon MiB", "driver MiB"]
    table = []
    for row in rows:
        table.append([row["label"], "-" if row["workers"] is None else str(row["workers"]), f"{row['seconds']:.2f}",
                      f"{row['input_gbps']:.3g}", ratio(row["x_floor"]), ratio(row["x_ta"]),
                      ratio(row["x_mergekit_best"]),
                      "/".join(mib(b) for b in row.get("worker_peak_rss_bytes", [])) or "-",
                      "/".join(mib(b) for b in row.get("worker_peak_anon_bytes", [])) or "-",
                      mib(row.get("driver_peak_rss_bytes"))])
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(line(header))
    print(line(["-" * w for w in widths]))
    for cells in table:
        print(line(cells))
    notes = {row["label"]: row["mergekit_equivalence"] for row in rows
             if row["kind"] in ("distmerge", "whole_process") and row.get("mergekit_equivalence") not in (None, "same")}
    for label, note in notes.items():
        print(f"x mk for {label}: {note}")
    print("\ndistmerge time per worker (read / merge / write s, busiest worker) vs wall:")
    for row in rows:
        if row["kind"] != "distmerge":
            continue
        busiest = max(row["worker_timings"], key=lambda t: sum(t.values()))
        busy = sum(busiest.values())
        print(f"  {row['label']:<16} w={row['workers']}: {busiest['read']:.2f} / {busiest['merge']:.2f} / "
              f"{busiest['write']:.2f}, busy {busy:.2f} of {row['seconds']:.2f}s wall; {row['shards']} shards on "
              f"{row['actors']} actor(s); read {row['bytes_read'] / 1e9:.3f} GB, "
              f"wrote {row['bytes_written'] / 1e9:.3f} GB")


if __name__ == "__main__":
    main()
