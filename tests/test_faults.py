"""The engine survives a lost worker and an interrupted driver, and fails cleanly on a full disk or a bad read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import merge_config
from distmerge import merge
from distmerge.errors import InputError, OutputError
from distmerge.io.writer import STAGING_MARK
from test_errors import nothing_written

pytestmark = pytest.mark.usefixtures("ray_cluster")

FAULT = "DISTMERGE_FAULT_INJECT"


def model_files(folder: Path) -> dict[str, bytes]:
    """Every file the merge wrote except the card (which records timings)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "README.md"}


@pytest.fixture(scope="module")
def ties_config(llama_family, tmp_path_factory) -> dict:
    base, experts = llama_family
    # Global TIES: two reduction passes, then the merge with deferred sign patches: every recovery path.
    return merge_config(base, experts, "ties", density=0.3, trim_scope="global")


@pytest.fixture(scope="module")
def clean_run(ties_config, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clean") / "merged"
    merge(ties_config, out, workers=2, progress=False)
    return out


def test_dead_worker_is_replaced_and_result_identical(ties_config, clean_run, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT, "worker_exit_after_groups=2@0")
    result = merge(ties_config, tmp_path / "merged", workers=2, progress=False)
    assert result.replaced_workers == 1
    assert {r["incarnation"] for r in result.worker_reports} == {0, 1}  # slot 0 runs on its replacement
    assert model_files(tmp_path / "merged") == model_files(clean_run)
    assert "replaced 1 dead worker" in result.summary()


def test_bytes_read_after_a_replacement_count_the_dead_workers_reads(ties_config, tmp_path, monkeypatch):
    clean = merge(ties_config, tmp_path / "clean", workers=2, progress=False)
    monkeypatch.setenv(FAULT, "worker_exit_after_groups=2@0")
    replaced = merge(ties_config, tmp_path / "replaced", workers=2, progress=False)
    assert replaced.replaced_workers == 1
    # Worker 0's first incarnation read 2 groups of a shard before it died; its replacement read them again.
    redone = redone_group_bytes(ties_config, 2)
    assert redone > 0
    assert replaced.bytes_read == clean.bytes_read + redone


def test_actors_exit_by_themselves_before_their_placement_group_is_removed(ties_config, tmp_path, monkeypatch):
    """A force-killed actor whose placement group is removed at once gets SIGTERMed by the raylet mid-exit,
    and the two exits racing can abort it (a crash dump in a successful run's output). A finished merge
    lets its actors exit themselves and removes the group once every one is gone."""
    import ray

    from distmerge.engine import pool as pool_module

    monkeypatch.setenv(pool_module.WARM_ENV, "0")  # the workers stop with their merge
    pools, seen, killed = [], [], []
    real_init, real_remove, real_kill = (pool_module.WorkerPool.__init__, pool_module.remove_placement_group,
                                         pool_module.ray.kill)

    def keep_pool(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        pools.append(self)

    def remove_checked(group):
        states = []
        for actor in pools[-1].actors:
            try:
                ray.get(actor.report.remote(), timeout=60)
                states.append("alive")
            except ray.exceptions.RayActorError:
                states.append("gone")
        seen.append(states)
        real_remove(group)

    def kill_recorded(actor, **kwargs):
        killed.append(actor)
        real_kill(actor, **kwargs)

    monkeypatch.setattr(pool_module.WorkerPool, "__init__", keep_pool)
    monkeypatch.setattr(pool_module, "remove_placement_group", remove_checked)
    monkeypatch.setattr(pool_module.ray, "kill", kill_recorded)
    merge(ties_config, tmp_path / "merged", workers=2, progress=False)
    assert seen == [["gone", "gone"]]
    assert not killed


def redone_group_bytes(config: dict, groups: int) -> int:
    """Input bytes worker 0 read again after dying in its ``groups``-th merge group (2 workers)."""
    from distmerge.config import load_config
    from distmerge.engine.driver import _group_input_bytes
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.plan import make_plan
    from distmerge.tensors import resolve_tensors

    merge_cfg = load_config(config)
    base = Checkpoint(merge_cfg.base_model, "base")
    experts = [Checkpoint(spec.model, spec.name) for spec in merge_cfg.models]
    outputs, _, _ = resolve_tensors(merge_cfg, base, experts)
    plan = make_plan(outputs, merge_cfg.out_shard_size, 2, 1 + len(experts))
    sizes = _group_input_bytes(plan, base, experts, merge_cfg.build_method().needs_base)
    # The dead actor finished whole shards before the one it died in; only that shard's groups are redone.
    left = groups
    for shard in plan.assignment[0]:
        count = len(plan.shards[shard].groups)
        if left <= count:
            return sum(sizes[shard, g] for g in range(left))
        left -= count
    raise AssertionError("worker 0 has fewer groups than the fault needs")


def _cli_merge(config_path: Path, out: Path, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != FAULT} | env_extra
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "distmerge.cli", "merge", str(config_path), "--out", str(out),
                           "--workers", "2", "--quiet"], env=env, capture_output=True, text=True, timeout=600)


def test_interrupted_driver_leaves_no_model_and_rerun_reuses_verified_shards(ties_config, clean_run, tmp_path):
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(yaml.safe_dump(ties_config))
    out = tmp_path / "merged"
    killed = _cli_merge(config_path, out, {FAULT: "driver_exit_after_shards=3"})
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert not out.exists()
    staging = [p for p in tmp_path.iterdir() if p.name.startswith(f".merged{STAGING_MARK}")]
    assert len(staging) == 1
    lines = [yaml.safe_load(line) for line in (staging[0] / ".distmerge-manifest.jsonl").read_text().splitlines()]
    manifest = [record for record in lines if "shard" in record]  # the other line commits the pass state
    assert len(manifest) >= 3 and len(lines) == len(manifest) + 1
    # A finished shard damaged after the interruption is not trusted: the rerun redoes it.
    damaged = staging[0] / manifest[0]["filename"]
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))

    # The rerun on the session's Ray: only the killed driver needs a process of its own.
    rerun = merge(config_path, out, workers=2, progress=False)
    assert f"reused {len(manifest) - 1} verified shard(s)" in rerun.summary()  # what the CLI prints
    assert model_files(out) == model_files(clean_run)
    assert not [p for p in tmp_path.iterdir() if STAGING_MARK in p.name]
    assert not any(p.name.startswith(".distmerge") or p.name == ".patches" for p in out.rglob("*"))


def test_disk_full_mid_run_fails_cleanly(ties_config, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT, "enospc_on_shard=1")
    with pytest.raises(OutputError, match="No space left on device") as info:
        merge(ties_config, tmp_path / "merged", workers=2, progress=False)
    assert "model-00002-of-" in str(info.value)
    assert nothing_written(tmp_path / "merged")


def test_unreadable_input_mid_run_names_file_and_tensor(ties_config, tmp_path, monkeypatch):
    tensor = "model.layers.1.mlp.up_proj.weight"
    monkeypatch.setenv(FAULT, f"eio_on_tensor={tensor}")
    with pytest.raises(InputError, match="Input/output error") as info:
        merge(ties_config, tmp_path / "merged", workers=2, progress=False)
    assert tensor in str(info.value) and ".safetensors" in str(info.value)
    assert nothing_written(tmp_path / "merged")


def test_a_bad_read_reads_the_same_when_the_driver_hears_of_the_unwritten_shard_first(
        llama_family, tmp_path, monkeypatch):
    """A worker's finish_shard of a shard whose merge failed raises the merge's error, not "incomplete": the
    driver can see that reply first. Here it always does: every call is awaited and the last one taken."""
    from distmerge.engine import pool

    real_wait = pool.ray.wait

    def latest_first(refs, num_returns=1, **kwargs):
        ready, _ = real_wait(refs, num_returns=len(refs))
        return [ready[-1]], [r for r in refs if r != ready[-1]]

    base, experts = llama_family
    tensor = "model.layers.1.mlp.up_proj.weight"
    monkeypatch.setenv(FAULT, f"eio_on_tensor={tensor}")
    monkeypatch.setattr(pool.ray, "wait", latest_first)
    config = merge_config(base, experts, "task_arithmetic", lam=0.5)
    with pytest.raises(InputError, match="Input/output error") as info:
        merge(config, tmp_path / "merged", workers=1, progress=False)
    assert tensor in str(info.value)
    assert nothing_written(tmp_path / "merged")


def test_progress_reports_bytes_and_summary(ties_config, tmp_path, capsys):
    result = merge(ties_config, tmp_path / "merged", workers=2, progress=True)
    err = capsys.readouterr().err
    assert "merge" in err and "B/s" in err  # a byte-rate bar with its ETA
    summary = result.summary()
    assert "B/s)" in summary and "peak worker memory" in summary
    assert all(r["peak_anon_bytes"] > 0 for r in result.worker_reports)
    card = (tmp_path / "merged" / "README.md").read_text()
    assert "read:" in card and "merge:" in card and "write:" in card and "peak_anon_mib" in card


def test_an_interrupted_emr_merge_resumes_to_the_clean_runs_rescalers(llama_family, tmp_path):
    """EMR's rescaler sums come with the merge, shard by shard: a resumed run takes the finished shards' sums
    from their manifest records and writes the clean run's bytes, emr/index.json included; a record without
    them (written before merge partials existed) is merged again."""
    base, experts = llama_family
    config = merge_config(base, experts, "emr")
    clean = tmp_path / "clean"
    merge(config, clean, workers=2, progress=False)
    config_path = tmp_path / "merge.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "merged"
    killed = _cli_merge(config_path, out, {FAULT: "driver_exit_after_shards=3"})
    assert killed.returncode == 3, killed.stderr[-2000:]
    staging = next(p for p in tmp_path.iterdir() if p.name.startswith(f".merged{STAGING_MARK}"))
    manifest = staging / ".distmerge-manifest.jsonl"
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    shards = [record for record in lines if "shard" in record]
    assert len(shards) >= 3 and all(record["partials"] for record in shards)
    del shards[0]["partials"]
    manifest.write_text("".join(json.dumps(record) + "\n" for record in lines))

    rerun = merge(config_path, out, workers=2, progress=False)
    assert f"reused {len(shards) - 1} verified shard(s)" in rerun.summary()
    assert model_files(out) == model_files(clean)
    assert json.loads((out / "emr" / "index.json").read_text())["metadata"]["rescalers"] == \
        json.loads((clean / "emr" / "index.json").read_text())["metadata"]["rescalers"]
