"""What a run reads back is data, checked before use, from folders no one else could have written: the
merge's pass state (JSON + safetensors with checksums in the manifest) and its staging folder. The FDA work
folder and the sweep's Tune folder are tested beside their fixtures, in test_fda.py and test_sweep.py."""

from __future__ import annotations

import json
import math
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import merge_config
from distmerge.engine.resume import (LEGACY_PASSES, MANIFEST, PASSES_JSON, RunFolder, decode_state,
                                     encode_state)
from distmerge.errors import OutputError
from distmerge.io.writer import STAGING_MARK
from test_faults import FAULT, _cli_merge, model_files

OTHER_UID = 12345


class PlantsMarker:
    """Unpickling this creates the marker folder: proof that a file was run as code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


# --- the state as data ------------------------------------------------------------------------------


def rich_state() -> dict:
    return {
        "densities": [0.3, 0.7], "numel": 2**53 + 1, "high_bins": [-1, 17], "fixed": [0.0, None],
        "thresholds": [float("inf"), -0.0, 1e-310, 0.1 + 0.2, float("-inf"), float("nan")],
        "flags": (True, False), "label": "ties", "nested": {"a": {"b": [[1, 2], (3.5, "x")]}},
        "hist": torch.arange(12, dtype=torch.int64).reshape(3, 4),
        "sums": torch.tensor([[1.5, -2.25], [3.0, 1e-30]], dtype=torch.float64),
        "half": torch.tensor([1.0, 65504.0], dtype=torch.float16),
        "brain": torch.tensor([3.140625, -1e38], dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]), "bytes": torch.tensor([0, 255], dtype=torch.uint8),
        "scalar": torch.tensor(7, dtype=torch.int32), "empty": torch.zeros(0, 5),
        "strided": torch.arange(20.0).reshape(4, 5).t(),  # not contiguous
        "in_list": [torch.ones(2), {"deep": torch.full((2, 2), 0.5)}],
    }


def assert_identical(a, b, where="state"):
    assert type(a) is type(b), f"{where}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b)), where
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    else:
        assert a == b, where


def open_run(tmp_path: Path) -> RunFolder:
    run = RunFolder(tmp_path / "merged", "0123456789abcdef")
    assert run.open() == {}
    return run


def test_pass_state_round_trips_exactly_through_json_and_safetensors(tmp_path):
    state = rich_state()
    run = open_run(tmp_path)
    run.save_passes(state)
    run.release()
    stored = sorted(p.name for p in run.path.iterdir())
    assert ".distmerge-passes.safetensors" in stored and PASSES_JSON in stored
    assert not any(name.endswith(".pkl") for name in stored)
    json.loads((run.path / PASSES_JSON).read_text())  # plain JSON, no NaN/Infinity literals
    assert "Infinity" not in (run.path / PASSES_JSON).read_text()

    again = RunFolder(run.out, "0123456789abcdef")
    again.open()
    assert_identical(state, again.load_passes())
    again.release()


def test_states_the_methods_make_round_trip(tmp_path):
    # What TIES (global) and EMR leave after their passes: lists of ints, floats, None and the infinities.
    from distmerge.ops.ties import KEEP_ALL, KEEP_NONE

    ties = {"densities": [0.3, 1.0], "numel": 123456, "high_bins": [40211, -1], "ranks": [77, 0],
            "fixed": [None, KEEP_ALL], "thresholds": [0.0123, KEEP_NONE]}
    emr = {"rescalers": [0.98, 1.02, 0.0]}
    for state in (ties, emr, {}):
        document, tensors = encode_state(state)
        assert not tensors
        assert_identical(state, decode_state(json.loads(json.dumps(document, allow_nan=False)), tensors))


@pytest.mark.parametrize("value, named", [
    (object(), "odd"), ({1, 2}, "odd"), (torch.float32, "odd"), (torch.zeros(2, dtype=torch.complex64), "odd"),
    ({1: 2}, "odd"), ({"$tensor": "x"}, "odd"), (PlantsMarker(Path("/nonexistent")), "odd"),
    (__import__("numpy").float64(1.0), "odd"),
])
def test_what_it_cannot_represent_is_refused_by_name(value, named):
    with pytest.raises(TypeError, match=f"pass state '{named}"):
        encode_state({"fine": [1, 2.0], named: value})


@pytest.mark.parametrize("document", [
    {"format": 1, "tensors": False, "state": {"a": {"$tensor": "missing"}}},
    {"format": 1, "tensors": False, "state": {"a": {"$float": "1e999"}}},
    {"format": 1, "tensors": False, "state": {"a": {"$pickle": "gASV"}}},
    {"format": 1, "tensors": False, "state": {"a": {"$tuple": [1], "b": 2}}},
    {"format": 2, "tensors": False, "state": {}},
    {"format": 1, "tensors": False, "state": [1, 2]},
])
def test_a_document_it_would_not_have_written_is_refused(document):
    with pytest.raises(ValueError):
        decode_state(document, {})


def test_a_state_file_that_fails_its_checksum_is_not_read(tmp_path):
    run = open_run(tmp_path)
    run.save_passes({"thresholds": [0.5, 0.25], "hist": torch.ones(3)})
    run.release()
    document = json.loads((run.path / PASSES_JSON).read_text())
    document["state"]["thresholds"] = [0.0, 0.0]  # valid JSON, valid state, not what the run computed
    (run.path / PASSES_JSON).write_text(json.dumps(document))

    again = RunFolder(run.out, "0123456789abcdef")
    again.open()
    assert again.load_passes() is None
    again.release()
    # The manifest no longer vouches for it.
    assert all("passes" not in json.loads(line) for line in (run.path / MANIFEST).read_text().splitlines())


def test_a_legacy_pickle_is_never_read(tmp_path):
    run = open_run(tmp_path)
    marker = tmp_path / "unpickled"
    (run.path / LEGACY_PASSES).write_bytes(pickle.dumps(PlantsMarker(marker)))
    run.release()
    again = RunFolder(run.out, "0123456789abcdef")
    again.open()
    assert again.load_passes() is None
    again.clear_bookkeeping()
    assert not marker.exists()
    assert not (run.path / LEGACY_PASSES).exists()


def test_the_staging_folder_is_private_while_staging(tmp_path):
    run = open_run(tmp_path)
    assert run.path.stat().st_mode & 0o777 == 0o700
    assert run.path.stat().st_uid == os.getuid()
    run.clear_bookkeeping()  # the finished model gets the usual mode
    from distmerge.engine.resume import current_umask

    assert run.path.stat().st_mode & 0o777 == 0o777 & ~current_umask()


@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("spoil", ["other_owner", "world_writable", "group_writable", "symlink"])
def test_a_staging_folder_others_could_write_is_not_reused(tmp_path, spoil):
    run = open_run(tmp_path)
    run.save_passes({"thresholds": [0.5]})
    run.release()
    apply_spoil(run.path, spoil, tmp_path)
    for attempt in (lambda r: r.open(), lambda r: r.discard()):
        again = RunFolder(run.out, "0123456789abcdef")
        with pytest.raises(OutputError) as info:
            attempt(again)
        message = str(info.value)
        assert str(run.path) in message and "remove it" in message and "\n" not in message
    assert os.path.lexists(run.path)  # refused, not deleted: it may be someone else's work


def apply_spoil(path: Path, spoil: str, tmp_path: Path) -> None:
    if spoil == "other_owner":
        os.chown(path, OTHER_UID, OTHER_UID)
    elif spoil == "world_writable":
        path.chmod(0o777)
    elif spoil == "group_writable":
        path.chmod(0o770)
    else:
        elsewhere = tmp_path / "elsewhere"
        path.rename(elsewhere)
        path.symlink_to(elsewhere)


# --- through the engine -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ties_config(llama_family) -> dict:
    base, experts = llama_family
    return merge_config(base, experts, "ties", density=0.3, trim_scope="global")


@pytest.fixture(scope="module")
def clean_run(ties_config, tmp_path_factory, ray_cluster) -> Path:
    from distmerge import merge

    out = tmp_path_factory.mktemp("clean") / "merged"
    merge(ties_config, out, workers=2, progress=False)
    return out


@pytest.fixture(scope="module")
def interrupted(ties_config, tmp_path_factory) -> tuple[Path, Path]:
    """(config file, staging folder) of a merge whose driver died after recording 2 shards."""
    root = tmp_path_factory.mktemp("interrupted")
    config_path = root / "merge.yaml"
    config_path.write_text(yaml.safe_dump(ties_config))
    killed = _cli_merge(config_path, root / "merged", {FAULT: "driver_exit_after_shards=2"})
    assert killed.returncode == 3, killed.stderr[-2000:]
    staging = [p for p in root.iterdir() if p.name.startswith(f".merged{STAGING_MARK}")]
    assert len(staging) == 1
    return config_path, staging[0]


def resume_in_process(config_path: Path, out: Path):
    """The rerun on the session's Ray (only the interrupted driver needs a process of its own to die in)."""
    from distmerge import merge

    return merge(config_path, out, workers=2, progress=False)


def copy_interrupted(interrupted, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A private copy of the interrupted run: (config file, staging folder, target)."""
    config_path, staging = interrupted
    copy = tmp_path / staging.name
    shutil.copytree(staging, copy, symlinks=True)
    copy.chmod(staging.stat().st_mode)
    return config_path, copy, tmp_path / "merged"


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_planted_pickle_is_never_unpickled_and_the_resumed_merge_is_identical(interrupted, clean_run, tmp_path):
    config_path, staging, out = copy_interrupted(interrupted, tmp_path)
    marker = tmp_path / "unpickled"
    # What an attacker with write access beside the target would leave: the file older versions unpickled.
    (staging / LEGACY_PASSES).write_bytes(pickle.dumps(PlantsMarker(marker)))

    rerun = resume_in_process(config_path, out)
    assert not marker.exists()
    assert rerun.resumed_shards == 2
    assert model_files(out) == model_files(clean_run)
    assert not any(p.name.startswith(".distmerge") for p in out.rglob("*"))


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_run_started_from_a_sample_is_not_resumed_where_the_trim_cannot_sample(interrupted, clean_run, tmp_path,
                                                                                  monkeypatch):
    """The interrupted run trimmed from a sample (numba, the CPU); a rerun that cannot (numba gone, a GPU found)
    starts over with the exact passes instead of finishing shards merged from estimates it cannot place."""
    from distmerge.methods.generalized import TaskVectorMerge

    config_path, staging, out = copy_interrupted(interrupted, tmp_path)
    monkeypatch.setattr(TaskVectorMerge, "leaves_undecided", lambda self, state: state)
    rerun = resume_in_process(config_path, out)
    assert rerun.resumed_shards == 0 and "trim_estimates" not in rerun.method_state
    assert model_files(out) == model_files(clean_run)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_tampered_pass_state_is_recomputed_not_trusted(interrupted, clean_run, tmp_path, caplog):
    config_path, staging, out = copy_interrupted(interrupted, tmp_path)
    document = json.loads((staging / PASSES_JSON).read_text())
    # the trim's sampled brackets, or its exact thresholds (where the merge cannot leave elements undecided)
    assert len(document["state"]["densities"]) == 2
    # keep every value: a different model, were it trusted
    document["state"].update(densities=[1.0, 1.0], ranks=[0, 0], fixed=[0.0, 0.0], thresholds=[0.0, 0.0])
    (staging / PASSES_JSON).write_text(json.dumps(document))

    with caplog.at_level("WARNING", logger="distmerge"):
        resume_in_process(config_path, out)
    assert any("recomputed" in record.getMessage() for record in caplog.records)
    assert model_files(out) == model_files(clean_run)


@pytest.mark.ray
@pytest.mark.timeout(600)
@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("spoil", ["other_owner", "world_writable"])
def test_the_engine_refuses_a_staging_folder_others_could_write(interrupted, tmp_path, spoil):
    config_path, staging, out = copy_interrupted(interrupted, tmp_path)
    marker = tmp_path / "unpickled"
    (staging / LEGACY_PASSES).write_bytes(pickle.dumps(PlantsMarker(marker)))
    apply_spoil(staging, spoil, tmp_path)
    before = sorted(p.name for p in staging.iterdir())

    with pytest.raises(OutputError, match="cannot be trusted") as refused:
        resume_in_process(config_path, out)
    assert str(staging) in str(refused.value) and "remove it" in str(refused.value)
    assert not marker.exists() and not out.exists()
    assert sorted(p.name for p in staging.iterdir()) == before  # nothing of it deleted or rewritten


def test_merge_partials_round_trip_exactly_through_json():
    """A shard's merge partials travel in its manifest record: float64 sums come back bit for bit."""
    from distmerge.methods.execute import partial_from_json, partial_to_json

    g = torch.Generator().manual_seed(3)
    partial = {"sums": torch.rand(2, 5, generator=g, dtype=torch.float64) * 1e-7, "count": 17, "scale": 0.1,
               "hist": torch.randint(0, 1 << 40, (4,), generator=g)}
    document = json.loads(json.dumps(partial_to_json(partial)))
    back = partial_from_json(document)
    assert torch.equal(back["sums"], partial["sums"]) and back["sums"].dtype == torch.float64
    assert torch.equal(back["hist"], partial["hist"]) and back["count"] == 17 and back["scale"] == 0.1
    assert math.isfinite(back["scale"])
    for bad in ({"sums": {"dtype": "float64", "shape": [2], "values": [1.0]}},
                {"sums": {"dtype": "object", "shape": [1], "values": [1.0]}},
                {"sums": [1.0, 2.0]}, ["not", "a", "mapping"]):
        with pytest.raises(ValueError):
            partial_from_json(bad)
    with pytest.raises(TypeError, match="'state'"):
        partial_to_json({"state": "text"})


def test_a_streamed_shards_hash_is_its_files_sha256(tmp_path):
    """The shard's SHA-256 (what a resume verifies) is hashed piece by piece on a helper thread while the caller
    goes on: it is the finished file's digest, pieces of every kind included; an aborted shard leaves nothing."""
    from safetensors.torch import load_file

    from distmerge.engine.resume import file_sha256
    from distmerge.io.writer import ShardWriter

    g = torch.Generator().manual_seed(0)
    big = torch.randn(300, 1000, generator=g)
    halves = torch.randn(64, 512, generator=g).bfloat16()
    mapped = torch.from_numpy(torch.randn(7, 9, generator=g).numpy())
    mapped.numpy().flags.writeable = False  # as a chunk of an input's read-only pages
    path = tmp_path / "model-00001-of-00001.safetensors"
    writer = ShardWriter(path, [("a", "float32", (300, 1000)), ("b", "bfloat16", (64, 512)), ("c", "float32", (7, 9))])
    for rows in range(0, 300, 37):  # row chunks, as a merge streams them
        writer.write("a", big[rows:rows + 37].clone())
    writer.write("b", halves)
    writer.write("c", mapped)
    result = writer.close()
    assert result["sha256"] == file_sha256(path)
    loaded = load_file(str(path))
    assert torch.equal(loaded["a"], big) and torch.equal(loaded["b"], halves) and torch.equal(loaded["c"], mapped)
    aborted = ShardWriter(tmp_path / "gone.safetensors", [("a", "float32", (300, 1000))])
    aborted.write("a", big[:100].clone())
    aborted.abort()
    assert not list(tmp_path.glob("gone*"))
