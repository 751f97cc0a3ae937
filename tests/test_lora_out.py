"""A merge written as a LoRA adapter: the exact sum of LoRA experts (concatenated factors) and the extraction of
any merged model by truncated SVD. Each adapter is reloaded with PEFT and compared with the dense merge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")

from typer.testing import CliRunner  # noqa: E402

from distmerge.cli import app  # noqa: E402
from distmerge.errors import ConfigError  # noqa: E402
from distmerge.io.lora import open_checkpoint  # noqa: E402
from distmerge.io.writer import STAGING_MARK  # noqa: E402
from distmerge.lora_extract import REPORT, ExtractOptions, extract, tensor_role, truncated_svd  # noqa: E402
from distmerge.lora_sum import coefficients, lora_sum  # noqa: E402
from distmerge.tiny_models import _config, _model, build_tokenizer, save_model  # noqa: E402
from test_lora import adapter_on, base_model, merged_tensors  # noqa: E402

runner = CliRunner()
EXPERT_TARGETS = {  # two experts per family, overlapping in some modules and not others
    "llama": [dict(target_modules=["q_proj", "v_proj", "down_proj"]),
              dict(target_modules=["q_proj", "gate_proj", "embed_tokens"], use_rslora=True, r=3)],
    "roberta": [dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
                dict(target_modules=["query", "dense"], modules_to_save=["classifier"], use_rslora=True, r=2)],
}


def peft_merged(arch: str, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base from its folder with the adapter loaded by PEFT, merged into dense weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if arch == "roberta" else AutoModelForCausalLM  # gpt2 too
    model = PeftModel.from_pretrained(auto.from_pretrained(str(base)), str(adapter))
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def assert_same_model(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], atol: float = 1e-5) -> int:
    """Every tensor of ``want`` in ``got`` (a state dict may add tied duplicates); the number compared."""
    for name, value in want.items():
        torch.testing.assert_close(got[name].float(), value.float(), rtol=0, atol=atol, msg=name)
    return len(want)


@pytest.fixture(scope="module", params=sorted(EXPERT_TARGETS))
def lora_experts(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"lora_out_{arch}")
    base = save_model(base_model(arch), build_tokenizer(64), root / "base")
    adapters = [adapter_on(base_model(arch), root / f"adapter_{i}", seed=20 + i, **targets)[0]
                for i, targets in enumerate(EXPERT_TARGETS[arch])]
    return arch, base, adapters


def sum_config(base: Path, adapters: list[Path], method: str) -> dict:
    params = {"lambda": 0.7} if method == "task_arithmetic" else {}
    return {"base_model": str(base), "method": method, "parameters": params,
            "models": [{"model": f"{base}+{a}", "name": f"e{i}", "parameters": {"weight": w}}
                       for i, (a, w) in enumerate(zip(adapters, (0.6, 1.3)))]}


@pytest.mark.ray
@pytest.mark.parametrize("method", ["task_arithmetic", "weight_average"])
def test_lora_sum_reloads_in_peft_as_the_merge(lora_experts, ray_cluster, tmp_path, method):
    from distmerge import merge

    arch, base, adapters = lora_experts
    config = sum_config(base, adapters, method)
    merge(config, tmp_path / "dense", workers=2, progress=False)
    result = lora_sum(config, tmp_path / "adapter")
    want = merged_tensors(tmp_path / "dense")
    assert assert_same_model(peft_merged(arch, base, tmp_path / "adapter"), want) == len(want)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    experts = [open_checkpoint(f"{base}+{a}", "x") for a in adapters]
    ranks = {}
    for expert in experts:
        for name, factors in expert.factors.items():
            if name not in expert.full:
                ranks[name.rsplit(".", 1)[0]] = ranks.get(name.rsplit(".", 1)[0], 0) + factors.rank
    assert result.ranks == ranks  # concatenated: the rank is the sum of the experts' ranks, module by module
    if arch == "roberta":
        assert "classifier.out_proj" in saved["modules_to_save"]
    # The adapter reads back as a distmerge LoRA expert: the same merged model again.
    again = open_checkpoint(f"{base}+{tmp_path / 'adapter'}", "sum")
    for name, value in want.items():
        torch.testing.assert_close(again.read(name).float(), value.float(), rtol=0, atol=1e-5, msg=name)


def test_lora_sum_refuses_a_method_that_is_not_low_rank(lora_experts, tmp_path):
    _, base, adapters = lora_experts
    config = {**sum_config(base, adapters, "task_arithmetic"), "method": "ties", "parameters": {"density": 0.5}}
    result = runner.invoke(app, ["lora", "sum", str(write_yaml(tmp_path, config)), "--out", str(tmp_path / "a")])
    assert result.exit_code == 2
    assert "method: 'ties' does not keep a merge of LoRAs low rank" in result.output
    assert "distmerge lora extract" in result.output
    assert not (tmp_path / "a").exists()


def test_lora_sum_refuses_a_full_expert(lora_experts, tmp_path):
    _, base, adapters = lora_experts
    config = sum_config(base, adapters, "task_arithmetic")
    config["models"][1]["model"] = str(base)
    with pytest.raises(ConfigError, match=r"models\[1\].model: '.*' is not a LoRA adapter"):
        lora_sum(config, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_lora_sum_cli_writes_the_adapter(lora_experts, tmp_path):
    _, base, adapters = lora_experts
    out = tmp_path / "adapter"
    config = write_yaml(tmp_path, sum_config(base, adapters, "task_arithmetic"))
    result = runner.invoke(app, ["lora", "sum", str(config), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote a LoRA adapter to {out}:")
    assert "(concatenated factors, exact)" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_weight_average_without_normalize_is_low_rank_only_when_the_weights_sum_to_one():
    from distmerge.methods.weight_average import WeightAverageParams

    assert coefficients("weight_average", WeightAverageParams(normalize=False), (0.25, 0.75), "t") == (0.25, 0.75)
    assert coefficients("weight_average", WeightAverageParams(), (1.0, 3.0), "t") == (0.25, 0.75)
    with pytest.raises(ConfigError, match=r"parameters.normalize: false with weights summing to 2 on tensor 't'"):
        coefficients("weight_average", WeightAverageParams(normalize=False), (1.0, 1.0), "t")


def write_yaml(folder: Path, config: dict) -> Path:
    import yaml

    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# --------------------------------------------------------------------------------------------- extraction


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def perturbed_pair(arch: str, root: Path) -> tuple[Path, Path]:
    """A base and a 'merged' model that differs from it in every tensor by a full-rank delta."""
    base = gpt2() if arch == "gpt2" else base_model(arch)
    merged = gpt2() if arch == "gpt2" else base_model(arch)
    torch.manual_seed(5)
    with torch.no_grad():
        for param in merged.parameters():
            param.add_(torch.randn_like(param) * 0.02)
    tokenizer = build_tokenizer(64)
    return save_model(base, tokenizer, root / "base"), save_model(merged, tokenizer, root / "merged")


@pytest.fixture(scope="module")
def dense_merge(tmp_path_factory):
    return perturbed_pair("llama", tmp_path_factory.mktemp("extract"))


def svd_optimum(delta: torch.Tensor, rank: int) -> float:
    """Eckart-Young: the least relative Frobenius error of any rank-r matrix."""
    s = torch.linalg.svdvals(delta.double())
    return float(s[rank:].square().sum().sqrt() / s.square().sum().sqrt())


@pytest.mark.ray
@pytest.mark.parametrize("arch", ["llama", "roberta", "gpt2"])
def test_extract_at_full_rank_reproduces_the_merged_model(dense_merge, ray_cluster, tmp_path, arch):
    base, merged = dense_merge if arch == "llama" else perturbed_pair(arch, tmp_path)
    result = extract(str(merged), str(base), tmp_path / "adapter", ExtractOptions(rank=1000, svd="exact"), workers=2)
    assert result.errors and max(result.errors.values()) < 1e-5
    embedding = {"llama": "embed_tokens", "roberta": "word_embeddings", "gpt2": "wte"}[arch]
    assert any(embedding in name for name in result.full) and any("ln_" in n or "orm" in n for n in result.full)
    if arch == "roberta":  # biases of the adapted Linear layers ride along as PEFT's base_layer.bias
        assert any(name.endswith("query.bias") for name in result.full)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["fan_in_fan_out"] == (arch == "gpt2")  # GPT-2's Conv1D stores its weights [in, out]
    want = merged_tensors(merged)
    assert_same_model(peft_merged(arch, base, tmp_path / "adapter"), want, atol=2e-6)


@pytest.mark.ray
def test_extract_at_rank_r_is_the_best_rank_r_approximation(dense_merge, ray_cluster, tmp_path):
    base, merged = dense_merge
    rank = 3
    result = extract(str(merged), str(base), tmp_path / "adapter", ExtractOptions(rank=rank, svd="exact"), workers=2)
    report = json.loads((tmp_path / "adapter" / REPORT).read_text())
    assert report["relative_error"] == pytest.approx(result.errors)
    base_t, merged_t = merged_tensors(base), merged_tensors(merged)
    reloaded = peft_merged("llama", base, tmp_path / "adapter")
    linear = {n for n, v in base_t.items() if v.dim() == 2 and "embed" not in n and "lm_head" not in n}
    assert set(result.errors) == linear
    for name, error in result.errors.items():
        delta = merged_t[name] - base_t[name]
        assert error == pytest.approx(svd_optimum(delta, rank), abs=1e-5), name
        # PEFT's reloaded delta has that error too, and rank r.
        reloaded_delta = reloaded[name] - base_t[name]
        assert torch.linalg.matrix_rank(reloaded_delta, atol=1e-6) == rank
        got = float(torch.linalg.norm(delta - reloaded_delta) / torch.linalg.norm(delta))
        assert got == pytest.approx(svd_optimum(delta, rank), abs=1e-4), name
    assert set(report["ranks"].values()) == {rank}


def test_randomized_svd_is_within_two_percent_of_the_optimum():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(300, 200))
    v, _ = torch.linalg.qr(torch.randn(200, 200))
    delta = (u * torch.logspace(0, -3, 200)) @ v.T  # a decaying spectrum, as a task vector's
    for rank in (4, 16):
        got_u, got_s, got_v = truncated_svd(delta, rank, "randomized", oversample=10, niter=4, seed=1)
        error = float(torch.linalg.norm(delta - (got_u * got_s) @ got_v.T) / torch.linalg.norm(delta))
        assert svd_optimum(delta, rank) <= error + 1e-7 <= 1.02 * svd_optimum(delta, rank) + 1e-7
        again = truncated_svd(delta, rank, "randomized", oversample=10, niter=4, seed=1)
        assert torch.equal(again[1], got_s)  # seeded: the same sketch every time


def test_tensor_roles_follow_the_module_types():
    types = {"block.0.attn.relative_attention_bias": "embedding", "h.0.attn.c_attn": "conv1d", "h.0.attn.q": "linear",
             "h.0.router": "other"}

    def role(name, shape=(8, 4), embed_lora=False):
        return tensor_role(name, shape, embed_lora, types.get(name.rpartition(".")[0]))

    assert role("block.0.attn.relative_attention_bias.weight") == "full"  # an embedding, whatever its name says
    assert role("block.0.attn.relative_attention_bias.weight", embed_lora=True) == "embedding"
    assert role("h.0.attn.c_attn.weight") == "conv1d" and role("h.0.attn.q.weight") == "linear"
    assert role("h.0.router.weight") == "full" and role("h.0.attn.q.bias", (8,)) == "full"
    assert role("lm_head.weight") == "full"  # the head stays whole, as mergekit keeps it
    # Without an architecture to build, names decide.
    assert role("model.embed_tokens.weight") == "full" and role("model.layers.0.mlp.up_proj.weight") == "linear"


@pytest.mark.ray
def test_extract_does_not_depend_on_the_number_of_workers(dense_merge, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    base, merged = dense_merge
    options = ExtractOptions(rank=4, svd="randomized", oversample=2, niter=2)
    outs = []
    for workers in (1, 3):
        extract(str(merged), str(base), tmp_path / f"w{workers}", options, workers=workers)
        outs.append(load_file(str(tmp_path / f"w{workers}" / "adapter_model.safetensors")))
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert torch.equal(outs[0][key], outs[1][key]), key


@pytest.mark.ray
def test_extract_in_bfloat16_halves_the_factors_and_reports_their_error(dense_merge, ray_cluster, tmp_path):
    from safetensors.torch import load_file

    base, merged = dense_merge
    result = extract(str(merged), str(base), tmp_path / "bf16", ExtractOptions(rank=1000, dtype="bfloat16"), workers=2)
    factors = {k: v for k, v in load_file(str(tmp_path / "bf16" / "adapter_model.safetensors")).items() if "lora_" in k}
    assert factors and {v.dtype for v in factors.values()} == {torch.bfloat16}
    # Full rank, so the error left is bfloat16's rounding of the factors: about its 2^-8 relative step.
    assert 1e-4 < max(result.errors.values()) < 1e-2


@pytest.mark.ray
def test_extract_skip_full_leaves_out_embeddings_and_norms(dense_merge, ray_cluster, tmp_path):
    base, merged = dense_merge
    options = ExtractOptions(rank=2, skip_full=True)
    result = extract(str(merged), str(base), tmp_path / "adapter", options, workers=1)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not result.full and saved["modules_to_save"] is None
    assert any("embed_tokens" in n for n in result.skipped) and any("norm" in n for n in result.skipped)


# --------------------------------------------------------------------------------------------- bad inputs


def nothing_written(parent: Path, out: Path) -> bool:
    return not out.exists() and not any(STAGING_MARK in p.name for p in parent.iterdir())


def test_extract_rank_must_be_positive(dense_merge, tmp_path):
    base, merged = dense_merge
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["lora", "extract", str(merged), "--base", str(base), "--rank", "0", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == ["error: --rank: must be a positive integer, got 0"]
    assert nothing_written(tmp_path, out)


def test_extract_refuses_a_merged_model_whose_shapes_differ(dense_merge, tmp_path):
    base, _ = dense_merge
    torch.manual_seed(0)
    other = save_model(_model("llama", _config("llama", 64, 48, 2, tie=False)), build_tokenizer(64), tmp_path / "other")
    out = tmp_path / "adapter"
    result = runner.invoke(app, ["lora", "extract", str(other), "--base", str(base), "--rank", "2", "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model 'merged'" in lines[0] and "does not match the base's" in lines[0]
    assert nothing_written(tmp_path, out)


def test_extract_refuses_an_existing_target_without_force(dense_merge, tmp_path):
    base, merged = dense_merge
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["lora", "extract", str(merged), "--base", str(base), "--rank", "2", "--out", str(out)])
    assert result.exit_code == 2
    refusal = f"error: '{out}' already exists; pass --force (force=True) to replace it"
    assert result.output.strip().splitlines() == [refusal]
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
