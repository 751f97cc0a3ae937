"""Parameters and inputs that would make a broken model are refused before any tensor is read (no Ray here)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import merge_config
from distmerge.config import load_config
from distmerge.engine.worker import check_finite_output, is_finite
from distmerge.errors import ConfigError, InputError, MergeError, OutputError
from distmerge.io import writer
from distmerge.io.checkpoint import Checkpoint
from distmerge.tensors import resolve_tensors


def config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    return path


DISTMERGE = """
base_model: /models/base
models:
  - model: /models/a
    name: a
    {a_params}
  - model: /models/b
    name: b
method: {method}
parameters: {{{params}}}
"""


@pytest.mark.parametrize("method,params,a_params,message", [
    ("task_arithmetic", "lambda: .nan", "", r"parameters.lambda: nan is not a finite number"),
    ("task_arithmetic", "lambda: .inf", "", r"parameters.lambda: inf is not a finite number"),
    ("ties", "lambda: -.inf", "", r"parameters.lambda: -inf is not a finite number"),
    ("ties", "density: .nan", "", r"parameters.density: nan is not a finite number"),
    ("dare", "drop_rate: .nan", "", r"parameters.drop_rate: nan is not a finite number"),
    ("task_arithmetic", "", "weight: .nan", r"models\[0\].parameters.weight: nan is not a finite number"),
    ("task_arithmetic", "", "weight: .inf", r"models\[0\].parameters.weight: inf is not a finite number"),
    ("task_arithmetic", "", "weight: [1.0, .nan]", r"models\[0\].parameters.weight\[1\]: nan is not a finite"),
    ("ties", "", "density: [{filter: mlp, value: .nan}, {value: 0.5}]",
     r"models\[0\].parameters.density\[0\].value: nan is not a finite number"),
    ("ties", "", "density: [0.2, 1.5]", r"models\[0\].parameters.density\[1\]: 1.5 is out of range"),
    ("ties", "", "density: .nan", r"models\[0\].parameters.density: nan is not a finite number"),
    ("dare", "", "drop_rate: -0.5", r"models\[0\].parameters.drop_rate: -0.5 is out of range"),
    ("dare", "", "drop_rate: .inf", r"models\[0\].parameters.drop_rate: inf is not a finite number"),
    ("weight_average", "", "weight: heavy", r"models\[0\].parameters.weight: expected a number"),
])
def test_non_finite_and_out_of_range_parameters_name_the_key(tmp_path, method, params, a_params, message):
    text = DISTMERGE.format(method=method, params=params, a_params=a_params)
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(tmp_path, text))


@pytest.mark.parametrize("text,message", [
    ("merge_method: task_arithmetic\nbase_model: /b\nmodels:\n  - model: /a\n    parameters: {weight: .nan}\n",
     r"models\[0\].parameters.weight: nan is not a finite number"),
    ("merge_method: ties\nbase_model: /b\nparameters: {density: .inf}\nmodels:\n  - model: /a\n"
     "    parameters: {weight: 1.0}\n", r"parameters.density: inf is not a finite number"),
])
def test_mergekit_dialect_refuses_non_finite_values(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config_file(tmp_path, text))


def checkpoints(base: Path, experts: list[Path]):
    return Checkpoint(str(base), "base"), [Checkpoint(str(p), f"e{i}") for i, p in enumerate(experts)]


@pytest.mark.parametrize("method,params", [
    ("weight_average", {}),
    ("task_arithmetic", {"normalize": True}),
    ("dare", {"then": "weight_average"}),
])
def test_weights_summing_to_zero_are_refused_where_the_method_divides(llama_family, method, params):
    base, experts = llama_family
    raw = merge_config(base, experts, method, **params)
    raw["models"][0]["weight"] = 1.0
    raw["models"][1]["weight"] = -1.0
    config = load_config(raw)
    with pytest.raises(ConfigError, match=r"weights of tensor '.*' sum to 0, and method"):
        resolve_tensors(config, *checkpoints(base, experts))


def test_zero_weight_sum_on_one_layer_of_a_gradient_is_refused(llama_family):
    base, experts = llama_family
    raw = merge_config(base, experts, "weight_average")
    raw["models"][0]["weight"] = [1.0, 1.0]
    raw["models"][1]["weight"] = [1.0, -1.0]  # sums to 0 on the last layer only
    with pytest.raises(ConfigError, match=r"weights of tensor 'model.layers.2\..*' sum to 0"):
        resolve_tensors(load_config(raw), *checkpoints(base, experts))


def test_zero_weight_sum_is_fine_where_nothing_divides(llama_family):
    base, experts = llama_family
    raw = merge_config(base, experts, "task_arithmetic")  # normalize: false: theta0 + lambda * (tau_0 - tau_1)
    raw["models"][0]["weight"] = 1.0
    raw["models"][1]["weight"] = -1.0
    outputs, _, _ = resolve_tensors(load_config(raw), *checkpoints(base, experts))
    assert any(o.merged for o in outputs)


def retyped_copy(tmp_path: Path, source: Path, name: str, dtype: torch.dtype, folder: str) -> Path:
    """``source`` as one safetensors file with tensor ``name`` stored as ``dtype``."""
    tensors = {}
    for shard in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    tensors[name] = tensors[name].to(dtype)
    out = tmp_path / folder
    out.mkdir()
    for extra in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / extra, out / extra)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_an_integer_tensor_where_the_base_has_weights_is_refused(llama_family, tmp_path):
    base, experts = llama_family
    name = "model.layers.1.mlp.up_proj.weight"
    bad = retyped_copy(tmp_path, experts[1], name, torch.int32, "int_expert")
    config = load_config(merge_config(base, [experts[0], bad], "ties"))
    with pytest.raises(InputError, match=rf"model 'e1', file '.*model.safetensors', tensor '{name}': dtype int32 "
                                         r"is integer, the reference model's is float32"):
        resolve_tensors(config, *checkpoints(base, [experts[0], bad]))


def test_a_float_expert_tensor_where_the_base_has_integers_is_refused(llama_family, tmp_path):
    base, experts = llama_family
    name = "model.layers.0.input_layernorm.weight"
    int_base = retyped_copy(tmp_path, base, name, torch.int64, "int_base")  # copied from the base: not merged
    config = load_config(merge_config(int_base, experts, "task_arithmetic"))
    with pytest.raises(InputError, match=rf"model 'e0', file '.*', tensor '{name}': dtype float32 is floating-point"):
        resolve_tensors(config, *checkpoints(int_base, experts))


def test_finite_checks_see_nan_inf_and_overflow():
    assert is_finite(torch.ones(1000, dtype=torch.float16) * 60000)  # the sum overflows float16, values do not
    assert not is_finite(torch.tensor([1.0, float("nan")]))
    assert not is_finite(torch.tensor([1.0, float("-inf")], dtype=torch.bfloat16))
    assert is_finite(torch.arange(5))
    big = torch.full((4,), 1e5).to(torch.float16)  # a float32 value past float16's range becomes inf when written
    with pytest.raises(MergeError, match=r"tensor 'w': the ties merge gives NaN or Inf in float16"):
        check_finite_output("w", big, "ties")


def test_target_under_a_file_names_the_file(tmp_path):
    blocker = tmp_path / "model.bin"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError, match=rf"'{blocker}' is a file, not a folder"):
        writer.check_target(blocker / "merged", force=False)
    with pytest.raises(OutputError, match=rf"'{blocker}' is a file"):
        writer.check_target(blocker / "a" / "merged", force=False)
    assert blocker.read_text() == "not a folder"


def test_missing_parent_folders_are_created(tmp_path):
    out = tmp_path / "a" / "b" / "merged"
    writer.check_target(out, force=False)
    assert out.parent.is_dir() and not out.exists()
