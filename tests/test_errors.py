"""Bad input gets a clear error naming the model, file and tensor, and loses nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import merge_config
from distmerge import merge
from distmerge.errors import ConfigError, InputError, MergeError, OutputError
from test_engine import load_folder

pytestmark = pytest.mark.usefixtures("ray_cluster")


def nothing_written(out: Path) -> bool:
    """No target and no staging folder left beside it."""
    leftovers = [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]
    return not out.exists() and not leftovers


def broken_expert(tmp_path: Path, source: Path, edit) -> Path:
    """A copy of ``source`` as a single safetensors file with ``edit(tensors)`` applied."""
    tensors = load_folder(source)
    edit(tensors)
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, folder / name)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_shape_mismatch_names_model_file_and_tensor(llama_family, tmp_path):
    base, experts = llama_family
    name = "model.layers.1.mlp.up_proj.weight"
    bad = broken_expert(tmp_path, experts[1], lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        merge(merge_config(base, [experts[0], bad], "task_arithmetic"), out, progress=False)
    message = str(err.value)
    assert "model 'e1'" in message and name in message and "model.safetensors" in message and "shape" in message
    assert nothing_written(out)


def test_missing_tensor(llama_family, tmp_path):
    base, experts = llama_family
    name = "model.layers.2.self_attn.q_proj.weight"
    bad = broken_expert(tmp_path, experts[0], lambda t: t.pop(name))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"model 'e0', tensor '{name}': missing"):
        merge(merge_config(base, [bad, experts[1]], "ties"), out, progress=False)
    assert nothing_written(out)


def test_corrupt_header(llama_family, tmp_path):
    base, experts = llama_family
    bad = copy_model(experts[0], tmp_path / "corrupt")
    shard = sorted(bad.glob("*.safetensors"))[2]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\x00garbage!!\xff\xfe"
    shard.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"model 'e0', file '.*{shard.name}': corrupt safetensors header"):
        merge(merge_config(base, [bad, experts[1]], "task_arithmetic"), out, progress=False)
    assert nothing_written(out)


def test_truncated_file(llama_family, tmp_path):
    base, experts = llama_family
    bad = copy_model(experts[1], tmp_path / "truncated")
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"model 'e1', file '.*{shard.name}', tensor '.*': truncated"):
        merge(merge_config(base, [experts[0], bad], "task_arithmetic"), out, progress=False)
    assert nothing_written(out)


def test_nan_input_fails_mid_run_and_leaves_nothing(llama_family, tmp_path):
    base, experts = llama_family
    name = "model.layers.2.mlp.down_proj.weight"

    def poison(tensors):
        tensors[name][3, 4] = float("nan")

    bad = broken_expert(tmp_path, experts[1], poison)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=rf"model 'e1', file '.*model.safetensors', tensor '{name}': contains NaN"):
        merge(merge_config(base, [experts[0], bad], "ties", density=0.3), out, workers=2, progress=False)
    assert nothing_written(out)


@pytest.mark.parametrize("method,params,message", [
    ("frankenmerge", {}, r"method: unknown method 'frankenmerge'"),
    ("ties", {"densty": 0.2}, r"parameters.densty: unknown parameter"),
    ("ties", {"density": 1.5}, r"parameters.density: 1.5 is out of range"),
    ("ties", {"density": 0}, r"parameters.density: 0 is out of range"),
    ("dare", {"drop_rate": -0.1}, r"parameters.drop_rate: -0.1 is out of range"),
    ("dare", {"then": "emr"}, r"parameters.then: 'emr' is not one of"),
    ("ties", {"trim_scope": "layer"}, r"parameters.trim_scope"),
])
def test_bad_config_is_rejected_before_any_read(llama_family, tmp_path, method, params, message):
    base, experts = llama_family
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=message):
        merge(merge_config(base, experts, method, **params), out, progress=False)
    assert nothing_written(out)


def test_missing_base_and_bad_keys(llama_family, tmp_path):
    base, experts = llama_family
    with pytest.raises(ConfigError, match="base_model: method 'ties' needs a base model"):
        merge(merge_config(None, experts, "ties"), tmp_path / "o", progress=False)
    config = merge_config(base, experts, "ties")
    config["lambda"] = 1.0
    with pytest.raises(ConfigError, match="lambda: unknown key"):
        merge(config, tmp_path / "o", progress=False)
    config = merge_config(base, experts, "task_arithmetic")
    config["models"][0]["density"] = 0.5
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.density: not a per-model parameter"):
        merge(config, tmp_path / "o", progress=False)


def test_hub_id_offline_says_how_to_point_at_a_local_copy(llama_family, tmp_path):
    base, experts = llama_family
    config = merge_config(base, experts, "task_arithmetic")
    config["models"][1] = {"model": "distmerge-test/not-a-real-model", "name": "hub"}
    with pytest.raises(InputError, match=r"model 'hub'.*not a local path.*hf download distmerge-test/not-a-real-model"):
        merge(config, tmp_path / "out", progress=False)


def test_existing_target_needs_force(llama_family, tmp_path):
    base, experts = llama_family
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(OutputError, match="already exists; pass --force"):
        merge(merge_config(base, experts, "task_arithmetic"), out, progress=False)
    assert (out / "keep.txt").read_text() == "precious"
    merge(merge_config(base, experts, "task_arithmetic"), out, force=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").exists()


def test_failed_forced_run_keeps_the_old_model(llama_family, tmp_path):
    base, experts = llama_family
    out = tmp_path / "out"
    merge(merge_config(base, experts, "task_arithmetic"), out, progress=False)
    before = load_folder(out)
    bad = broken_expert(tmp_path, experts[1], lambda t: t["model.norm.weight"].fill_(float("inf")))
    with pytest.raises(InputError, match="contains NaN or Inf"):
        merge(merge_config(base, [experts[0], bad], "task_arithmetic"), out, force=True, progress=False)
    after = load_folder(out)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.fixture
def readonly_dir(tmp_path):
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() == 0:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
            pytest.skip("root, and no immutable attribute here: cannot make a folder unwritable")
        yield folder
        subprocess.run(["chattr", "-i", str(folder)])
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_no_write_permission(llama_family, readonly_dir):
    base, experts = llama_family
    with pytest.raises(OutputError, match=str(readonly_dir)):
        merge(merge_config(base, experts, "task_arithmetic"), readonly_dir / "out", progress=False)
    assert not list(readonly_dir.iterdir())


def test_nan_in_an_excluded_tensor_is_still_reported(llama_family, tmp_path):
    base, experts = llama_family
    bad_base = broken_expert(tmp_path, base, lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan")))
    config = merge_config(bad_base, experts, "task_arithmetic")
    config["exclude"] = ["lm_head"]
    with pytest.raises(InputError, match="model 'base'.*tensor 'lm_head.weight': contains NaN"):
        merge(config, tmp_path / "out", progress=False)


@pytest.mark.parametrize("params,weight,out_dtype", [
    ({"lambda": 1e3}, 1e38, None),             # overflows float32 while merging
    ({"lambda": 1e30}, 1.0, "float16"),        # finite in float32, past float16's range when written
])
def test_a_non_finite_merged_tensor_stops_the_run(llama_family, tmp_path, params, weight, out_dtype):
    base, experts = llama_family
    config = merge_config(base, experts, "task_arithmetic", **params)
    config["models"][0]["weight"] = weight
    if out_dtype:
        config["out_dtype"] = out_dtype
    out = tmp_path / "out"
    with pytest.raises(MergeError, match=r"tensor '.*': the task_arithmetic merge gives NaN or Inf"):
        merge(config, out, workers=2, progress=False)
    assert nothing_written(out)


def test_emr_task_creates_missing_parent_folders(llama_family, tmp_path):
    from distmerge.emr_task import materialize_task

    base, experts = llama_family
    merged = tmp_path / "emr"
    merge(merge_config(base, experts, "emr"), merged, progress=False)
    out = materialize_task(merged, "e1", tmp_path / "a" / "b" / "c")
    assert (out / "model.safetensors.index.json").exists()
