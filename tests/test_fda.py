"""FDA end to end on Ray with tiny models built here: construction, adaptation, resumption, the pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distmerge.errors import ConfigError, InputError, OutputError
from distmerge.fda.config import load_fda_config

ROOT = Path(__file__).resolve().parents[1]
LAYERS = 2


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from distmerge.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("fda_llama"), "llama", experts=2, hidden=32, layers=LAYERS,
                        delta_scale=0.02)


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    from distmerge.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("fda_roberta"), "roberta", experts=2, hidden=32, layers=1)


@pytest.fixture(scope="module")
def ta_merge(llama, tmp_path_factory):
    """Task arithmetic (λ 0.5) of the tiny family, saved as a sharded model folder: the initial merge given as a
    path (the inline engine merge is exercised by the pipeline test)."""
    from transformers import AutoModelForCausalLM

    from distmerge.tiny_models import build_tokenizer, save_model

    base, experts = llama
    model = AutoModelForCausalLM.from_pretrained(str(base))
    expert_states = [AutoModelForCausalLM.from_pretrained(str(p)).state_dict() for p in experts]
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            tensor.copy_(tensor + 0.5 * sum(state[name] - tensor for state in expert_states))
    return save_model(model, build_tokenizer(128), tmp_path_factory.mktemp("fda_ta") / "ta", shard_size="40KB")


def llama_config(llama, initial, **overrides) -> dict:
    base, experts = llama
    config = {"base": str(base), "experts": {"math": str(experts[0]), "code": str(experts[1])},
              "initial": str(initial), "anchors": {"count": 32, "steps": 12},
              "adapt": {"epochs": 4, "batch_size": 16}, "resources": {"num_cpus": 0.5, "retries": 1}}
    for key, value in overrides.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from distmerge.io.checkpoint import Checkpoint

    checkpoint = Checkpoint(str(folder), "x")
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def anchor_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for path in sorted(folder.glob("layer_*/task_*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[f"{path.parent.name}/{path.stem}/{key}"] = value
    return out


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, different[:5]


class Interrupt(Exception):
    pass


def interrupt_after(count: int):
    seen = []

    def callback(result):
        seen.append(result)
        if len(seen) >= count:
            raise Interrupt()

    return callback


# --- config validation (no Ray) -------------------------------------------------------------------


@pytest.mark.parametrize("change, message", [
    ({"anchors": {"count": 0}}, "anchors.count: expected an integer >= 1, got 0"),
    ({"anchors": {"init": "zeros"}}, "anchors.init: 'zeros' is not one of gauss, weights"),
    ({"adapt": {"loss": "kl"}}, "adapt.loss: 'kl' is not one of cos, mse, l1"),
    ({"adapt": {"epoch": 3}}, "adapt.epoch: unknown key"),
    ({"initial": {"method": "nope"}}, "initial: "),
    ({"resources": {"memory": "lots"}}, "resources.memory: expected a size"),
    ({"experts": {}}, "experts: needs at least one expert"),
    ({"modules": "attention"}, "modules: 'attention' is not one of mlp, block"),
    ({"layers": [-1]}, "layers: expected a non-empty list"),
])
def test_config_errors_name_the_field(change, message):
    raw = {"base": "b", "experts": {"math": "m", "code": "c"}, **change}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_fda_config(raw)


def test_family_defaults_and_errors(llama, roberta, tmp_path):
    """What a config leaves out comes from its model family's row of the defaults; what it gives wins."""
    from distmerge.fda.schema import DECODER_BLOCK_ANCHORS, FAMILY_DEFAULTS
    from distmerge.fda.inputs import open_inputs

    def resolved(raw):
        config = open_inputs(raw).config
        return config, {**{f"anchors.{k}": v for k, v in vars(config.anchors).items()},
                        **{f"adapt.{k}": v for k, v in vars(config.adapt).items()}}

    left_out = {"anchors": {"count": None, "steps": None}, "adapt": {"epochs": None, "batch_size": None}}
    llama_defaults = FAMILY_DEFAULTS["decoder"]
    config, values = resolved(llama_config(llama, "unused", **left_out))
    assert config.modules == llama_defaults["modules"]
    for section in ("anchors", "adapt"):
        for key in ("count", "steps") if section == "anchors" else ("epochs", "batch_size"):
            assert values[f"{section}.{key}"] == llama_defaults[section][key], (section, key)
    given = {"anchors": {"count": 5, "steps": 3, "sigma": 0.5}, "adapt": {"epochs": 2, "batch_size": 7, "alpha_init": 0.25}}
    _, values = resolved(llama_config(llama, "unused", **given))
    for section, settings in given.items():
        for key, value in settings.items():
            assert values[f"{section}.{key}"] == value, (section, key)
    assert open_inputs(llama_config(llama, "unused")).unit_names == ("gate_proj.weight", "up_proj.weight", "down_proj.weight")

    base, experts = roberta  # an encoder: the family is read from the checkpoint, and its row differs
    encoder, encoder_values = resolved({"base": str(base), "experts": {"a": str(experts[0])}})
    encoder_defaults = FAMILY_DEFAULTS["encoder"]
    assert encoder.modules == encoder_defaults["modules"] != llama_defaults["modules"]
    for key in ("tokens", "count", "steps"):
        assert encoder_values[f"anchors.{key}"] == encoder_defaults["anchors"][key], key
    for key in ("loss", "sources", "alpha_init"):
        assert encoder_values[f"adapt.{key}"] == encoder_defaults["adapt"][key], key
    block = open_inputs(llama_config(llama, "unused", modules="block", anchors={"count": None, "steps": None}))
    for key, value in DECODER_BLOCK_ANCHORS.items():  # whole decoder blocks take the block anchors' shape
        assert getattr(block.config.anchors, key) == value, key
    assert block.unit_tensors(1)[0].startswith("model.layers.1.") and len(block.unit_names) == 9
    with pytest.raises(ConfigError, match="modules: 'mlp' is not supported for encoder models"):
        open_inputs({"base": str(base), "experts": {"a": str(experts[0])}, "modules": "mlp"})
    with pytest.raises(ConfigError, match="layers: 7 is out of range"):
        open_inputs(llama_config(llama, "unused", layers=[7]))
    path = tmp_path / "fda.yaml"
    path.write_text("base: x\nexperts: {a: y}\nanchors: {steps: -1}\n")
    with pytest.raises(ConfigError, match=r"fda\.yaml: anchors\.steps"):
        load_fda_config(path)


def test_cli_reports_errors_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from distmerge.cli import app

    path = tmp_path / "fda.yaml"
    path.write_text("base: x\nexperts: {a: y}\nanchors: {init: zeros}\n")
    result = CliRunner().invoke(app, ["fda", "construct", str(path), "--out", str(tmp_path / "anchors")])
    assert result.exit_code == 2
    assert "anchors.init: 'zeros' is not one of gauss, weights" in result.output
    assert "Traceback" not in result.output


# --- stage I --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_anchors(llama, ta_merge, tmp_path_factory, ray_cluster):
    """Anchors of both layers and tasks, 3 jobs in flight."""
    from distmerge import fda

    out = tmp_path_factory.mktemp("fda_ref") / "anchors"
    result = fda.construct(llama_config(llama, ta_merge), out, workers=3, progress=False)
    assert (result.jobs, result.skipped, len(result.results)) == (LAYERS * 2, 0, LAYERS * 2)
    return out


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_construction_reduces_the_loss_and_keeps_the_best(llama, ta_merge, reference_anchors):
    from distmerge.fda.inputs import open_inputs
    from distmerge.fda.modules import read_unit, unit_forward, unit_module
    from distmerge.ops import fda as ops

    inputs = open_inputs(llama_config(llama, ta_merge))
    names = list(inputs.unit_names)
    for layer in range(LAYERS):
        for task in ("math", "code"):
            meta = json.loads((reference_anchors / f"layer_{layer}" / f"task_{task}.json").read_text())
            assert meta["best_loss"] < meta["initial_loss"]
            assert meta["config_hash"] == inputs.config.construction_key(layer, task)
            stored = anchor_tensors(reference_anchors)
            anchors = stored[f"layer_{layer}/task_{task}/anchors"]
            assert anchors.shape == (32, 32)
            # The stored anchors are the best seen: their loss is the recorded best, below the initial one.
            module = unit_module(inputs.base, inputs.layout, layer)
            base = read_unit(inputs.base, inputs.layout, layer, names, "float32")
            expert = read_unit(inputs.experts[task], inputs.layout, layer, names, "float32")
            forward = ops.unit_forward(module)
            tau = {n: expert[n] - base[n] for n in names}
            leaves = {n: t.clone().requires_grad_(True) for n, t in base.items()}
            loss = ops.alignment_loss(ops.anchor_gradients(forward, leaves, expert, anchors), tau).item()
            assert loss == pytest.approx(meta["best_loss"], rel=1e-4)
            # The stored targets are the expert's outputs on them.
            with torch.no_grad():
                expected = forward(expert, anchors)
            assert torch.allclose(stored[f"layer_{layer}/task_{task}/targets"], expected, atol=1e-6)


def _gradient_alignment(inputs, anchors_dir, layer, task):
    """Mean cos(g_k, τ_k) over the unit's tensors, for the constructed and for the initial anchors."""
    from distmerge.fda.modules import read_unit, unit_forward, unit_module
    from distmerge.ops import fda as ops

    config = inputs.config
    names = list(inputs.unit_names)
    forward = unit_forward(inputs.base, inputs.layout, unit_module(inputs.base, inputs.layout, layer))
    base = read_unit(inputs.base, inputs.layout, layer, names, "float32")
    expert = read_unit(inputs.experts[task], inputs.layout, layer, names, "float32")
    generator = torch.Generator().manual_seed(ops.derive_seed(config.seed, "anchors", layer, task))
    shape = (config.anchors.tokens, inputs.layout.hidden_size) if config.anchors.tokens else (inputs.layout.hidden_size,)
    initial = ops.gauss_anchors(config.anchors.count, shape, config.anchors.sigma, generator)
    built = anchor_tensors(anchors_dir)[f"layer_{layer}/task_{task}/anchors"]
    before = ops.gradient_cosines(forward, base, expert, initial)
    after = ops.gradient_cosines(forward, base, expert, built)
    return sum(before.values()) / len(before), sum(after.values()) / len(after)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_anchor_gradient_aligns_with_the_task_vector_llama_mlp(llama, ta_merge, tmp_path, ray_cluster):
    from distmerge import fda
    from distmerge.fda.inputs import open_inputs

    config = llama_config(llama, ta_merge, layers=[1], anchors={"steps": 60})
    fda.construct(config, tmp_path / "anchors", workers=2, progress=False)
    inputs = open_inputs(config)
    for task in ("math", "code"):
        before, after = _gradient_alignment(inputs, tmp_path / "anchors", 1, task)
        assert after > before + 0.2, (task, before, after)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_decoder_block_unit_computes_the_layer_as_the_model_does(llama, arch, tmp_path):
    """The whole-decoder-layer unit, fed the hidden states a real forward pass gives layer 1, returns what that
    layer returned inside the model (rotary positions and causal mask included)."""
    from transformers import AutoModelForCausalLM

    from distmerge.fda.inputs import open_inputs
    from distmerge.fda.modules import read_unit, unit_forward, unit_module
    from distmerge.tiny_models import build_family

    family = llama if arch == "llama" else build_family(tmp_path, arch, experts=2, hidden=32, layers=2)
    inputs = open_inputs(llama_config(family, "unused", modules="block"))
    model = AutoModelForCausalLM.from_pretrained(str(family[0])).eval()
    seen = {}
    hook = model.model.layers[1].register_forward_hook(
        lambda module, args, output: seen.update(x=args[0], y=output[0] if isinstance(output, tuple) else output))
    with torch.no_grad():
        model(torch.randint(3, 100, (3, 7)))
    hook.remove()
    names = list(inputs.unit_names)
    forward = unit_forward(inputs.base, inputs.layout, unit_module(inputs.base, inputs.layout, 1))
    params = read_unit(inputs.base, inputs.layout, 1, names, "float32")
    with torch.no_grad():
        out = forward(params, seen["x"])
        assert torch.allclose(out, seen["y"], atol=1e-5)
        # causal: later tokens do not change earlier outputs
        changed = seen["x"].clone()
        changed[:, 4:] += 1.0
        again = forward(params, changed)
    assert torch.allclose(again[:, :4], out[:, :4], atol=1e-6) and not torch.allclose(again[:, 4:], out[:, 4:])


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_decoder_block_anchors_align_and_adaptation_fits_them(llama, ta_merge, tmp_path, ray_cluster):
    from transformers import AutoModelForCausalLM

    from distmerge import fda
    from distmerge.fda.inputs import open_inputs

    config = llama_config(llama, ta_merge, modules="block", layers=[1],
                          anchors={"count": 8, "tokens": 4, "steps": 40}, adapt={"epochs": 6, "batch_size": 8})
    fda.construct(config, tmp_path / "anchors", progress=False)
    stored = anchor_tensors(tmp_path / "anchors")
    assert stored["layer_1/task_math/anchors"].shape == (8, 4, 32)
    inputs = open_inputs(config)
    for task in ("math", "code"):
        before, after = _gradient_alignment(inputs, tmp_path / "anchors", 1, task)
        assert after > before + 0.1, (task, before, after)
    adapted = fda.adapt(config, tmp_path / "anchors", tmp_path / "merged", progress=False)
    assert [r["final_loss"] < r["initial_loss"] for r in adapted.results] == [True]
    merged, initial = tensors_of(tmp_path / "merged"), tensors_of(ta_merge)
    moved = {n for n in merged if not torch.equal(merged[n], initial[n])}
    assert any(".self_attn." in n for n in moved) and any(".mlp." in n for n in moved)
    assert all(n.startswith("model.layers.1.") for n in moved)  # layer 0 and the rest: the initial merge
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert torch.isfinite(model(torch.tensor([[1, 5, 6]])).logits).all()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_anchor_gradient_aligns_with_the_task_vector_roberta_layer(roberta, tmp_path, ray_cluster):
    from distmerge import fda
    from distmerge.fda.inputs import open_inputs

    base, experts = roberta
    config = {"base": str(base), "experts": {"a": str(experts[0]), "b": str(experts[1])},
              "anchors": {"count": 8, "tokens": 4, "steps": 40}, "resources": {"num_cpus": 0.5}}
    result = fda.construct(config, tmp_path / "anchors", progress=False)
    assert len(result.results) == 2
    inputs = open_inputs(config)
    assert len(inputs.unit_names) == 16  # attention q/k/v/o, LayerNorms, intermediate, output: weights and biases
    stored = anchor_tensors(tmp_path / "anchors")
    assert stored["layer_0/task_a/anchors"].shape == (8, 4, 32)
    assert stored["layer_0/task_a/targets"].shape == (8, 4, 32)
    for task in ("a", "b"):
        before, after = _gradient_alignment(inputs, tmp_path / "anchors", 0, task)
        assert after > before + 0.1, (task, before, after)
    # Stage II the RoBERTa way: inline TA(0.3) initial merge, one elementwise α per expert, mse loss.
    config["adapt"] = {"epochs": 3, "batch_size": 8}
    adapted = fda.adapt(config, tmp_path / "anchors", tmp_path / "merged", progress=False)
    assert [r["final_loss"] < r["initial_loss"] for r in adapted.results] == [True]
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged"))
    assert model(torch.tensor([[0, 5, 6, 2]])).logits.shape == (1, 3)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_anchors_do_not_depend_on_the_number_of_workers(llama, ta_merge, reference_anchors, tmp_path):
    from distmerge import fda

    fda.construct(llama_config(llama, ta_merge), tmp_path / "anchors", workers=1, progress=False)
    assert_same(anchor_tensors(tmp_path / "anchors"), anchor_tensors(reference_anchors))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_construction_resumes_after_an_interruption(llama, ta_merge, reference_anchors, tmp_path):
    from distmerge import fda

    config = llama_config(llama, ta_merge)
    out = tmp_path / "anchors"
    with pytest.raises(Interrupt):
        fda.construct(config, out, workers=1, progress=False, on_result=interrupt_after(2))
    # Leftovers of an interrupted write are never trusted: a tensor file without its commit mark, a .partial.
    done = sorted(out.glob("layer_*/task_*.json"))
    assert len(done) >= 2
    done[0].unlink()
    (out / "layer_1").mkdir(exist_ok=True)
    (out / "layer_1" / "task_code.safetensors.partial").write_bytes(b"half")
    rerun = fda.construct(config, out, workers=2, progress=False)
    assert rerun.skipped == len(done) - 1 and len(rerun.results) == LAYERS * 2 - rerun.skipped
    assert_same(anchor_tensors(out), anchor_tensors(reference_anchors))
    again = fda.construct(config, out, progress=False)
    assert (again.skipped, again.results) == (LAYERS * 2, [])
    # A changed setting changes the hash: the jobs run again.
    changed = fda.construct(llama_config(llama, ta_merge, anchors={"steps": 3}, layers=[0]), out, progress=False)
    assert changed.skipped == 0 and len(changed.results) == 2


# --- stage II -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_model(llama, ta_merge, reference_anchors, tmp_path_factory):
    from distmerge import fda

    out = tmp_path_factory.mktemp("fda_model") / "merged"
    result = fda.adapt(llama_config(llama, ta_merge), reference_anchors, out, workers=2, progress=False)
    assert (result.layers, result.skipped) == (LAYERS, 0)
    return out, result


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_zero_epochs_return_the_initial_merge_exactly(llama, ta_merge, reference_anchors, tmp_path):
    from transformers import AutoModelForCausalLM

    from distmerge import fda

    out = tmp_path / "merged"
    fda.adapt(llama_config(llama, ta_merge, adapt={"epochs": 0}), reference_anchors, out, progress=False)
    assert_same(tensors_of(out), tensors_of(ta_merge))
    assert not (tmp_path / ".merged.fda-work").exists()
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 128)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_adaptation_moves_outputs_toward_the_experts(llama, ta_merge, reference_anchors, reference_model):
    from distmerge.fda.inputs import open_inputs
    from distmerge.fda.modules import read_unit, unit_forward, unit_module
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.ops import fda as ops

    out, result = reference_model
    assert all(r["final_loss"] < r["initial_loss"] for r in result.results)
    inputs = open_inputs(llama_config(llama, ta_merge))
    merged, initial = Checkpoint(str(out), "merged"), Checkpoint(str(ta_merge), "ta")
    stored = anchor_tensors(reference_anchors)
    names = list(inputs.unit_names)
    adapted_names = set()
    for layer in range(LAYERS):
        forward = unit_forward(inputs.base, inputs.layout, unit_module(inputs.base, inputs.layout, layer))
        x = torch.cat([stored[f"layer_{layer}/task_{t}/anchors"] for t in ("math", "code")])
        y = torch.cat([stored[f"layer_{layer}/task_{t}/targets"] for t in ("math", "code")])
        with torch.no_grad():
            cos_after = ops.similarity(forward(read_unit(merged, inputs.layout, layer, names, "float32"), x), y)
            cos_before = ops.similarity(forward(read_unit(initial, inputs.layout, layer, names, "float32"), x), y)
        assert cos_after > cos_before, layer
        adapted_names |= set(inputs.unit_tensors(layer))
    # Everything outside the adapted MLPs is the initial merge, bit for bit.
    merged_tensors, ta_tensors = tensors_of(out), tensors_of(ta_merge)
    assert_same({k: v for k, v in merged_tensors.items() if k not in adapted_names},
                {k: v for k, v in ta_tensors.items() if k not in adapted_names})
    assert any(not torch.equal(merged_tensors[k], ta_tensors[k]) for k in adapted_names)
    summary = json.loads((out / "fda_summary.json").read_text())
    assert sorted(summary["layers"]) == ["0", "1"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_adapted_model_does_not_depend_on_the_number_of_workers(llama, ta_merge, reference_anchors,
                                                                 reference_model, tmp_path):
    from distmerge import fda

    fda.adapt(llama_config(llama, ta_merge), reference_anchors, tmp_path / "merged", workers=1, progress=False)
    assert_same(tensors_of(tmp_path / "merged"), tensors_of(reference_model[0]))


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_adaptation_resumes_after_an_interruption(llama, ta_merge, reference_anchors, reference_model, tmp_path):
    from distmerge import fda

    config = llama_config(llama, ta_merge)
    out = tmp_path / "merged"
    with pytest.raises(Interrupt):
        fda.adapt(config, reference_anchors, out, workers=1, progress=False, on_result=interrupt_after(1))
    assert not out.exists()  # nothing half-written at the target
    assert len(list((tmp_path / ".merged.fda-work").glob("layer_*.json"))) >= 1
    assert (tmp_path / ".merged.fda-work").stat().st_mode & 0o777 == 0o700  # read back: no one else may write it
    rerun = fda.adapt(config, reference_anchors, out, workers=1, progress=False)
    assert rerun.skipped >= 1 and rerun.skipped + len(rerun.results) == LAYERS
    assert_same(tensors_of(out), tensors_of(reference_model[0]))
    with pytest.raises(OutputError, match="already exists"):
        fda.adapt(config, reference_anchors, out, progress=False)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("spoil", ["other_owner", "world_writable", "symlink"])
def test_adapt_refuses_a_work_folder_others_could_write(llama, ta_merge, reference_anchors, tmp_path, spoil):
    from distmerge import fda

    out, work = tmp_path / "merged", tmp_path / ".merged.fda-work"
    work.mkdir(mode=0o700)
    (work / "layer_0.json").write_text(json.dumps({"config_hash": "planted"}))
    if spoil == "other_owner":
        os.chown(work, 12345, 12345)
    elif spoil == "world_writable":
        work.chmod(0o777)
    else:
        work.rename(tmp_path / "elsewhere")
        work.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError) as info:
        fda.adapt(llama_config(llama, ta_merge), reference_anchors, out, progress=False)
    assert f"the FDA work folder '{work}'" in str(info.value) and "cannot be trusted" in str(info.value)
    assert os.path.lexists(work) and (work / "layer_0.json").exists()  # refused, not deleted
    assert not out.exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_adapt_refuses_anchors_of_another_config(llama, ta_merge, reference_anchors, tmp_path):
    from distmerge import fda

    with pytest.raises(InputError, match="built with a different config"):
        fda.adapt(llama_config(llama, ta_merge, anchors={"steps": 13}), reference_anchors, tmp_path / "m",
                  progress=False)
    with pytest.raises(InputError, match="no anchors for layer 0"):
        fda.adapt(llama_config(llama, ta_merge), tmp_path, tmp_path / "m", progress=False)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_construct_then_adapt(llama, ta_merge, tmp_path, ray_cluster):
    import yaml
    from typer.testing import CliRunner

    from distmerge.cli import app

    path = tmp_path / "fda.yaml"
    path.write_text(yaml.safe_dump(llama_config(llama, ta_merge, layers=[1], anchors={"steps": 3},
                                                adapt={"epochs": 1})))
    runner = CliRunner()
    built = runner.invoke(app, ["fda", "construct", str(path), "--out", str(tmp_path / "anchors"), "-q"])
    assert built.exit_code == 0, built.output
    assert "2 (layer, task) job(s) run, 0 already done" in built.output
    adapted = runner.invoke(app, ["fda", "adapt", str(path), "--anchors", str(tmp_path / "anchors"),
                                  "--out", str(tmp_path / "merged"), "-q"])
    assert adapted.exit_code == 0, adapted.output
    assert "1 layer(s) adapted" in adapted.output
    again = runner.invoke(app, ["fda", "adapt", str(path), "--anchors", str(tmp_path / "anchors"),
                                "--out", str(tmp_path / "merged"), "-q"])
    assert again.exit_code == 2 and "already exists; pass --force" in again.output


CRASH_SIGNS = ("SIGABRT", "SIGSEGV", "Mutex corrupt", "core dumped", "Check failed", "*** Aborted")


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_cli_adapt_prints_no_worker_crash(llama, reference_anchors, tmp_path):
    """The command as a user runs it: its own embedded Ray, every worker's output streamed to the driver
    (log_to_driver), the inline initial merge's actors started and stopped on the way."""
    import yaml

    path = tmp_path / "fda.yaml"
    config = {**llama_config(llama, None), "initial": {"method": "task_arithmetic", "lambda": 0.5}}
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run([sys.executable, "-m", "distmerge.cli", "fda", "adapt", str(path), "--anchors",
                             str(reference_anchors), "--out", str(tmp_path / "merged"), "--workers", "2"],
                            capture_output=True, text=True, timeout=280, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "layer(s) adapted" in output
    crashes = [line for line in output.splitlines() if any(sign in line for sign in CRASH_SIGNS)]
    assert not crashes, "\n".join(crashes[:20])


# --- Ray plumbing ---------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(120)
def test_a_job_whose_process_dies_is_retried(tmp_path, ray_cluster):
    from distmerge.fda.schema import Resources
    from distmerge.fda.runner import FdaJobError, run_jobs

    def dies_once(marker: str, job: int) -> int:  # defined here: pickled by value for the worker
        if not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies mid-job, as when it is killed or runs out of memory
        return job * 10

    options = Resources(num_cpus=0.5, retries=1).ray_options()
    marker = str(tmp_path / "died")
    assert run_jobs(dies_once, marker, [7], options=options, names=["dies-once"], progress=False) == [70]
    with pytest.raises(FdaJobError, match="dies-twice"):
        run_jobs(dies_once, str(tmp_path / "again"), [1], options={**options, "max_retries": 0},
                 names=["dies-twice"], progress=False)


# --- the pipeline ---------------------------------------------------------------------------------


def test_pipeline_help():
    result = subprocess.run([sys.executable, str(ROOT / "pipelines" / "nlg_fda.py"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    assert "--preset" in result.stdout and "WizardMath" in result.stdout


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_tiny_preset_runs_end_to_end(tmp_path, ray_cluster, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nlg_fda", ROOT / "pipelines" / "nlg_fda.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    assert pipeline.main(["--preset", "tiny", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("nlg_fda: 4 anchor jobs (0 reused), 2 layers adapted (0 reused)")
    merged = tmp_path / "run" / "merged"
    assert (merged / "model.safetensors.index.json").is_file() and (merged / "fda.yaml").is_file()
    assert sorted(p.name for p in (tmp_path / "run" / "anchors" / "layer_0").iterdir()) == \
        ["task_code.json", "task_code.safetensors", "task_math.json", "task_math.safetensors"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_sigma_choice_compares_the_same_draw_and_matches_construction(llama, ta_merge, tmp_path, ray_cluster):
    """Each sigma's loss is what construction itself reaches from that sigma (same draw, same steps), and the
    chosen sigma is the one with the lowest mean loss over the tasks."""
    from typer.testing import CliRunner

    from distmerge import fda
    from distmerge.cli import app

    config = llama_config(llama, ta_merge, anchors={"count": 16, "steps": 8})
    result = fda.choose_sigma(config, sigmas=(1e-3, 0.5), layer=1, progress=False)
    assert result.layer == 1 and result.steps == 8 and len(result.results) == 4
    assert result.chosen == min(result.mean_loss, key=result.mean_loss.get)
    assert result.mean_loss[1e-3] != result.mean_loss[0.5]
    for sigma in (1e-3, 0.5):
        built = fda.construct(llama_config(llama, ta_merge, layers=[1], anchors={"count": 16, "steps": 8,
                                                                                "sigma": sigma}),
                              tmp_path / f"anchors-{sigma}", progress=False)
        for meta in built.results:
            by_sigma = [r for r in result.results if r["sigma"] == sigma and r["task"] == meta["task"]]
            assert by_sigma[0]["best_loss"] == pytest.approx(meta["best_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="sigma only scales Gaussian anchors"):
        fda.choose_sigma(llama_config(llama, ta_merge, anchors={"init": "weights"}), progress=False)
    path = tmp_path / "fda.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    out = CliRunner().invoke(app, ["fda", "sigma", str(path), "--sigmas", "1e-3,0.5", "--layer", "1", "--quiet"])
    assert out.exit_code == 0, out.output
    assert f"sigma {result.chosen:g}: best mean alignment loss after 8 construction steps on layer 1" in out.output
