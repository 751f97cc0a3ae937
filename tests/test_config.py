"""Config loading and validation in both dialects, without Ray or tensors."""

from __future__ import annotations

import pytest
import yaml

from distmerge.config import load_config, parse_size, resolve_setting
from distmerge.errors import ConfigError
from distmerge.methods import method_params_yaml


def test_distmerge_yaml_file(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("""
base_model: meta-llama/Llama-2-13b-hf
models:
  - model: WizardLM/WizardMath-13B-V1.0
    name: math
  - model: layoric/llama-2-13b-code-alpaca
    weight: 0.5
method: ties
parameters: {lambda: 1.0, density: 0.2, trim_scope: global, disjoint: mean}
dtype: float32
out_dtype: bfloat16
tokenizer: base
exclude: ['.*classifier.*']
out_shard_size: 2GB
""")
    config = load_config(path)
    assert config.names == ("math", "llama-2-13b-code-alpaca")
    assert config.models[1].parameters == {"weight": 0.5}
    assert config.out_shard_size == 2_000_000_000 and config.out_dtype == "bfloat16"
    resolved = config.to_yaml_dict()
    assert resolved["parameters"] == {"lambda": 1.0, "density": 0.2, "trim_scope": "global", "disjoint": "mean",
                                      "convention": "paper", "trim_rescale": "none"}
    assert load_config(resolved).to_yaml_dict() == resolved


@pytest.mark.parametrize("text,message", [
    ("models: [a]\nmethod: ties\nbase_model: b\nfoo: 1", r"^foo: unknown key"),
    ("models: []\nmethod: ties", r"^models: expected a non-empty list"),
    ("models: [a]\nbase_model: b", r"^method: missing"),
    ("models: [a]\nmethod: ties\nbase_model: b\ndtype: int8", r"^dtype: 'int8' is not one of"),
    ("models: [a, a]\nmethod: task_arithmetic\nbase_model: b", r"^models\[1\].name: 'a' is used twice"),
    ("models: [a]\nmethod: ties\nbase_model: b\ntokenizer: nope", r"^tokenizer: 'nope' is neither"),
    ("models: [a]\nmethod: ties\nbase_model: b\nexclude: ['(']", r"^exclude\[0\]: invalid regular expression"),
    ("models: [a]\nmethod: ties\nbase_model: b\nout_shard_size: lots", r"^out_shard_size: expected a size"),
    ("models: [{model: a, density: [{filter: x}]}]\nmethod: ties\nbase_model: b",
     r"^models\[0\].parameters.density\[0\]: a filtered value needs"),
    ("models: [a]\nmethod: dare\nbase_model: b\nparameters: {then: ties, density: 2}",
     r"^parameters.density: 2 is out of range"),
    ("models: [a]\nmethod: ties\nbase_model: b\nparameters: {trim_scope: global, trim_rescale: l1}",
     r"^parameters.trim_rescale: 'l1' is a per-tensor rescale"),
    ("[1, 2]", r"^config: expected a mapping"),
])
def test_errors_name_the_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_unreadable_and_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_settings_gradients_and_filters():
    assert resolve_setting(0.5, "x", 0.3) == 0.5
    assert resolve_setting([0.0, 1.0], "x", 0.25) == pytest.approx(0.25)
    assert resolve_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    filtered = [{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.7}]
    assert resolve_setting(filtered, "model.layers.3.self_attn.q_proj.weight", 0.5) == 0.1
    assert resolve_setting(filtered, "model.layers.3.mlp.up_proj.weight", 0.5) == pytest.approx(0.5)
    assert resolve_setting(filtered, "model.norm.weight", 0.0) == 0.7


def test_sizes():
    assert parse_size("1GB", "k") == 10**9 and parse_size("512MiB", "k") == 512 * 2**20 and parse_size(123, "k") == 123
    with pytest.raises(ConfigError):
        parse_size(-1, "k")


def mergekit(text: str):
    return load_config(yaml.safe_load(text))


def test_mergekit_ties_translation():
    config = mergekit("""
merge_method: ties
base_model: ./base
models:
  - model: ./base
  - model: ./math
    parameters: {density: 0.5, weight: 1.0}
  - model: ./code
    parameters: {density: [0.2, 0.8], weight: 0.5}
parameters: {normalize: true, int8_mask: true}
dtype: bfloat16
""")
    assert config.source_format == "mergekit" and config.method == "ties"
    assert config.names == ("math", "code")  # the base is never a task vector
    method = config.build_method()
    assert method_params_yaml(method) == {"lambda": 1.0, "density": 1.0, "trim_scope": "tensor", "disjoint": "mean",
                                          "convention": "mergekit", "trim_rescale": "none"}
    assert config.dtype == "bfloat16" and config.out_dtype == "bfloat16"
    assert config.models[1].parameters["density"] == [0.2, 0.8]


def test_mergekit_dare_and_linear_translation():
    dare = mergekit("""
merge_method: dare_ties
base_model: ./base
models:
  - model: ./a
    parameters: {density: 0.3, weight: 1}
  - model: ./c
parameters: {density: 0.6}
""")
    assert dare.method == "dare"
    params = method_params_yaml(dare.build_method())
    assert params["then"] == "ties" and params["rescale"] == "l1" and params["disjoint"] == "sum"
    assert params["density"] == 1.0 and params["convention"] == "mergekit"
    assert dare.models[0].parameters["drop_rate"] == pytest.approx(0.7)
    assert dare.models[1].parameters["drop_rate"] == pytest.approx(0.4)  # the shared value, as kept fraction 0.6

    linear = mergekit("""
merge_method: linear
models:
  - {model: ./a, parameters: {weight: 0.3}}
  - {model: ./b, parameters: {weight: 0.7}}
""")
    assert linear.method == "weight_average" and linear.base_model is None
    assert method_params_yaml(linear.build_method()) == {"normalize": True}

    dare_linear = mergekit("merge_method: dare_linear\nbase_model: ./b\nmodels: [./a]\nparameters: {rescale: false}")
    assert method_params_yaml(dare_linear.build_method())["rescale"] == "none"


@pytest.mark.parametrize("text,message", [
    ("merge_method: passthrough\nmodels: [a]", r"merge_method: .passthrough. is not supported"),
    ("merge_method: ties\nslices: []", r"slices: layer slicing"),
    ("merge_method: ties\nbase_model: b\nmodels: [a]\nparameters: {epsilon: 0.1}", r"parameters.epsilon"),
    ("merge_method: ties\nbase_model: b\nmodels: [b]", r"models: no model to merge"),
])
def test_mergekit_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        mergekit(text)


def _no_base_config(method: str, parameters: dict | None = None, models: int = 2) -> dict:
    return {"models": [{"model": f"/nowhere/e{i}", "name": f"e{i}"} for i in range(models)], "method": method,
            "parameters": parameters or {}}


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "breadcrumbs", "breadcrumbs_ties", "della",
                                    "della_linear", "emr", "model_stock", "tsv", "iso_c", "iso_cts"])
def test_every_task_vector_method_without_a_base_says_it_needs_one(method):
    with pytest.raises(ConfigError, match=rf"base_model: method '{method}' needs a base model"):
        load_config(_no_base_config(method))


def test_methods_without_a_base_need_none_unless_told_to_use_it():
    for method in ("weight_average", "slerp", "nuslerp"):
        assert not load_config(_no_base_config(method)).build_method().needs_base
    with pytest.raises(ConfigError, match="base_model: method 'nuslerp' needs a base model"):
        load_config(_no_base_config("nuslerp", {"use_base": True}))
    with pytest.raises(ConfigError, match="statistics: regmean needs the folder written by `distmerge measure regmean`"):
        load_config(_no_base_config("regmean"))


@pytest.mark.parametrize("method,models,wanted", [("model_stock", 1, "at least 2"), ("slerp", 3, "exactly 2"),
                                                  ("nuslerp", 1, "exactly 2")])
def test_methods_that_need_a_number_of_experts_say_so_before_reading(method, models, wanted):
    from distmerge.methods import TensorJob

    config = _no_base_config(method, models=models) | {"base_model": "/nowhere/base"}
    built = load_config(config).build_method()
    job = TensorJob(name="w", numel=4, model_names=tuple(f"e{i}" for i in range(models)), weights=(1.0,) * models,
                    per_model={}, per_tensor={})
    with pytest.raises(ConfigError, match=rf"models: method '{method}' needs {wanted} models to merge, the config "
                                          rf"has {models}"):
        built.initial_state([job])
