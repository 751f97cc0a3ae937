"""Twin-Merging's per-factor LoRA variant (``exclusive.lora: factors``, the reference's generative way): theta* is
the merge of the LoRA factors, each factor's difference gets its own truncated SVD, and the routed layer mixes the
factors per sample. Checked against hand computations on small factors; ``product`` stays the default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError
from distmerge.twin.config import ExclusiveConfig, load_twin_config
from distmerge.twin.folder import LoraShared
from test_twin import batch_ids, load_plain, twin_config

LAMBDA = 0.3
TARGETS = ["q_proj", "down_proj"]


def make_lora(base: Path, out: Path, seed: int, rank: int = 4, alpha: int = 8, targets=None) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_plain(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS,
                                                        init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def lora_family(tmp_path_factory):
    from distmerge.tiny_models import build_family

    root = tmp_path_factory.mktemp("twin_factors")
    base, _ = build_family(root / "family", "llama", experts=0, layers=2)
    return root, base, [make_lora(base, root / f"lora{i}", seed=10 + i) for i in range(2)]


def factors_config(root, base, adapters, exclusive=None, shared=None) -> dict:
    config = twin_config(root, base, [(f"t{i}", {"model": str(base), "lora": str(a)}) for i, a in enumerate(adapters)],
                         exclusive or {"rank": 4, "svd": "exact", "lora": "factors"})
    config["shared"] = shared or {"method": "task_arithmetic", "parameters": {"lambda": LAMBDA}}
    return config


def test_per_factor_svd_matches_a_hand_computation():
    from distmerge.twin.compress import compress_factors

    g = torch.Generator().manual_seed(0)
    a_t, b_t = torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g)
    a_other, b_other = torch.randn(4, 10, generator=g), torch.randn(12, 4, generator=g)
    shared = LoraShared(LAMBDA * (a_t + a_other), LAMBDA * (b_t + b_other), 2.0)
    part = compress_factors(a_t, b_t, shared, ExclusiveConfig(rank=2, svd="exact"), seed=0)
    for delta, us, v in ((a_t - shared.lora_a, part.a_us, part.a_v), (b_t - shared.lora_b, part.b_us, part.b_v)):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # each factor's own best rank-2 approximation
        assert us.shape[1] == v.shape[1] == 2
        torch.testing.assert_close(us @ v.T, (u[:, :2] * s[:2]) @ vh[:2], rtol=0, atol=1e-5)
    d_a, d_b = part.a_us @ part.a_v.T, part.b_us @ part.b_v.T
    want = 2.0 * ((shared.lora_b + d_b) @ (shared.lora_a + d_a) - shared.lora_b @ shared.lora_a)
    torch.testing.assert_close(part.dense(), want, rtol=0, atol=1e-5)
    # at the LoRA rank the factors come back exactly: theta* + E_t is the expert's base + s B_t A_t
    full = compress_factors(a_t, b_t, shared, ExclusiveConfig(rank=64, svd="exact"), seed=0)
    torch.testing.assert_close(full.dense() + 2.0 * shared.lora_b @ shared.lora_a, 2.0 * b_t @ a_t, rtol=0,
                               atol=1e-4)


def test_factors_is_opt_in_and_checked_at_the_config_edge(lora_family):
    root, base, adapters = lora_family
    assert ExclusiveConfig().lora == "product"
    assert load_twin_config(factors_config(root, base, adapters, {"rank": 4})).exclusive.lora == "product"
    with pytest.raises(ConfigError, match=r"exclusive.lora.*'nope'.*product, factors"):
        load_twin_config(factors_config(root, base, adapters, {"rank": 4, "lora": "nope"}))
    with pytest.raises(ConfigError, match=r"shared.method: exclusive.lora: factors merges the LoRA factors .* not "
                                          r"'ties'"):
        load_twin_config(factors_config(root, base, adapters, shared={"method": "ties",
                                                                      "parameters": {"density": 0.5}}))
    config = factors_config(root, base, adapters)
    config["models"][0]["parameters"] = {"weight": 0.5}
    with pytest.raises(ConfigError, match=r"models\[0\].parameters: exclusive.lora: factors .* weight"):
        load_twin_config(config)


def test_factor_experts_are_checked_before_ray(lora_family):
    from distmerge.io.lora import open_checkpoint
    from distmerge.tiny_models import build_family
    from distmerge.twin.builder import check_factor_experts

    root, base, adapters = lora_family
    _, (full,) = build_family(root / "full_family", "llama", experts=1, layers=2)
    config = load_twin_config(twin_config(root, base, [("t0", {"model": str(base), "lora": str(adapters[0])}),
                                                       ("t1", {"model": str(full)})],
                                          {"rank": 4, "lora": "factors"}))
    experts = [open_checkpoint(s.model, s.name) for s in config.merge.models]
    with pytest.raises(ConfigError, match=r"models\[1\] \('t1'\): exclusive.lora: factors needs every expert to be "
                                          r"a LoRA adapter"):
        check_factor_experts(config, experts)


def test_mismatched_factor_experts_name_the_module_and_what_differs(lora_family, tmp_path):
    from distmerge.io.lora import open_checkpoint
    from distmerge.twin.builder import check_factor_experts

    root, base, adapters = lora_family
    module = "model.layers.0.mlp.down_proj.weight"  # the first adapted module in name order
    cases = [({"rank": 2, "alpha": 4}, rf"{module}: its rank 2 against 4 in 't0'"),  # same scale, another rank
             ({"alpha": 4}, rf"{module}: its scale 1.0 against 2.0 in 't0'"),
             ({"targets": ["q_proj"]}, r"it does not adapt model.layers.0.mlp.down_proj.weight, which 't0' does"),
             ({"targets": [*TARGETS, "v_proj"]}, r"it adapts model.layers.0.self_attn.v_proj.weight, which 't0' "
                                                 r"does not")]
    for i, (options, message) in enumerate(cases):
        other = make_lora(base, tmp_path / f"other{i}", seed=20 + i, **options)
        config = load_twin_config(twin_config(root, base, [("t0", {"model": str(base), "lora": str(adapters[0])}),
                                                           ("t1", {"model": str(base), "lora": str(other)})],
                                              {"rank": 4, "lora": "factors"}))
        experts = [open_checkpoint(s.model, s.name) for s in config.merge.models]
        with pytest.raises(ConfigError, match=rf"^models\[1\] \('t1'\): {message}; exclusive.lora: factors "
                                              r"averages the factors"):
            check_factor_experts(config, experts)


def hand_shared(base: Path, adapters: list[Path]) -> dict[str, torch.Tensor]:
    """theta* of the factors: base + scale * (lambda sum B_t)(lambda sum A_t) on every adapted weight."""
    from safetensors.torch import load_file

    state = load_plain(base).state_dict()
    stored = [load_file(str(a / "adapter_model.safetensors")) for a in adapters]
    for key in [k for k in stored[0] if k.endswith("lora_A.weight")]:
        a_star = LAMBDA * sum(s[key] for s in stored)
        b_star = LAMBDA * sum(s[key.replace("lora_A", "lora_B")] for s in stored)
        name = key.removeprefix("base_model.model.").replace(".lora_A", "")
        state[name] = state[name] + 2.0 * b_star @ a_star  # lora_alpha / r = 8 / 4
    return state


def factor_folder(root: Path, base: Path, adapters: list[Path], rank: int) -> Path:
    """A factors-mode twin folder built in process (the same compress_group and finish_folder as twin build),
    theta* written from the hand formula."""
    from transformers import AutoTokenizer

    from distmerge.io.lora import open_checkpoint
    from distmerge.twin.builder import check_factor_experts, compress_calls, finish_folder, write_exclusive_index
    from distmerge.twin.compress import compress_group
    from distmerge.twin.router import train_router

    config = load_twin_config(factors_config(root, base, adapters, {"rank": rank, "svd": "exact", "lora": "factors"}))
    folder = root / "twin"
    model = load_plain(base)
    model.load_state_dict(hand_shared(base, adapters))
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(folder))
    experts = [open_checkpoint(s.model, s.name) for s in config.merge.models]
    check_factor_experts(config, experts)
    calls = compress_calls(config, folder, experts)
    assert all(call[-1] == LAMBDA for call in calls)  # the factor coefficient rides after the staging folder
    results = [compress_group(*call) for call in calls]
    write_exclusive_index(folder, config, results)
    features = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32)
    finish_folder(folder, config, results, train_router(features, np.array([0, 1] * 4), ["t0", "t1"], epochs=1),
                  "in-process test build")
    return folder


@pytest.fixture(scope="module")
def factor_twin(lora_family):
    root, base, adapters = lora_family
    return factor_folder(root, base, adapters, rank=2)


def test_routed_factor_mixing_equals_per_sample_recomposition(factor_twin, lora_family):
    """W(x) = base + s (B* + sum_t w_t dB_t)(A* + sum_t w_t dA_t), rebuilt per sample: the batched layer equals it."""
    from distmerge.twin import load
    from distmerge.twin.folder import ExclusiveStore

    _, base, _ = lora_family
    store, shared = ExclusiveStore(factor_twin), load_plain(factor_twin)
    sample = store.part("t0", "model.layers.0.self_attn.q_proj.weight")
    assert sample.in_lora_space and sample.a_us.shape == (4, 2) and sample.b_us.shape == (32, 2)
    base_state = load_plain(base).state_dict()
    weights = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    model = load(factor_twin)
    model.twin.fixed = weights
    ids = batch_ids(3)
    with torch.no_grad():
        batched = model(input_ids=ids).logits
    params = dict(shared.named_parameters())
    for row in range(3):
        recomposed = dict(params)
        for tensor in store.tensors("t0"):
            parts = [store.part(f"t{t}", tensor) for t in range(2)]
            lora = parts[0].shared
            a = lora.lora_a + sum(weights[row, t] * p.a_us @ p.a_v.T for t, p in enumerate(parts))
            b = lora.lora_b + sum(weights[row, t] * p.b_us @ p.b_v.T for t, p in enumerate(parts))
            recomposed[tensor] = base_state[tensor] + lora.scale * b @ a
        with torch.no_grad():
            single = torch.func.functional_call(shared, recomposed, (), {"input_ids": ids[row:row + 1]}).logits
        torch.testing.assert_close(batched[row:row + 1], single, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)


def test_factor_parts_at_the_lora_rank_give_each_expert_back(lora_family, tmp_path):
    """rank >= the LoRA rank: theta* + E_t (twin task, and the routed model one-hot) is peft's merged expert."""
    from peft import PeftModel

    from distmerge.twin import load, write_task_model

    root, base, adapters = lora_family
    folder = factor_folder(tmp_path, base, adapters, rank=8)
    routed = load(folder)
    ids = batch_ids(2)
    for t, adapter in enumerate(adapters):
        expert = PeftModel.from_pretrained(load_plain(base), str(adapter)).merge_and_unload().eval()
        written = load_plain(write_task_model(folder, f"t{t}", tmp_path / f"t{t}")).state_dict()
        for name, value in expert.state_dict().items():
            torch.testing.assert_close(written[name], value, rtol=0, atol=1e-5, msg=name)
        routed.twin.fixed = torch.nn.functional.one_hot(torch.tensor([t, t]), 2).float()
        with torch.no_grad():
            torch.testing.assert_close(routed(input_ids=ids).logits, expert(input_ids=ids).logits, rtol=0,
                                       atol=1e-4)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_build_merges_the_factors_for_theta_star(ray_cluster, lora_family, tmp_path):
    """twin build with exclusive.lora: factors: theta* is base + s B* A* (the merged adapter, by the engine), and
    the stored parts (and shared factors) are the ones compressed in process against it."""
    import json

    from distmerge.io.lora import open_checkpoint
    from distmerge.twin import build
    from distmerge.twin.compress import compress_factors, merged_factors, tensor_seed
    from distmerge.twin.folder import FACTOR_KINDS, REPORT, ExclusiveStore, read_manifest
    from distmerge.twin.task import copy_at_rank

    root, base, adapters = lora_family
    config = factors_config(tmp_path, base, adapters, {"rank": 2, "svd": "exact", "lora": "factors"})
    config["router"].update(epochs=2, batch_size=32, holdout=0.0, max_samples=8)
    folder = build(config, tmp_path / "twin", workers=2, progress=False).out
    assert read_manifest(folder)["exclusive"]["lora"] == "factors"
    got, want = load_plain(folder).state_dict(), hand_shared(base, adapters)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-5, msg=name)
    assert not list(tmp_path.glob(".*adapter*")), "the merged adapter was left behind"
    # every stored part is compress_factors' (the builder's function) of that expert's factors against the
    # in-process merged factors, at the same seed
    twin = load_twin_config(config)
    experts = [(spec.name, open_checkpoint(spec.model, spec.name)) for spec in twin.merge.models]
    store, compared = ExclusiveStore(folder), 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the builder's Ray tasks compute
    try:
        for tensor in experts[0][1].factors:
            shared = merged_factors(experts, tensor, LAMBDA)
            for task, expert in experts:
                stored = store.part(task, tensor)
                assert stored.in_lora_space and stored.rank == 2, (task, tensor)
                torch.testing.assert_close(stored.shared.lora_a, shared.lora_a, rtol=0, atol=1e-6)
                torch.testing.assert_close(stored.shared.lora_b, shared.lora_b, rtol=0, atol=1e-6)
                assert stored.shared.scale == shared.scale
                a, b = expert.factor_tensors(expert.factors[tensor])
                again = compress_factors(a, b, shared, twin.exclusive, tensor_seed(twin.exclusive, task, tensor))
                for kind in FACTOR_KINDS:
                    torch.testing.assert_close(getattr(stored, kind), getattr(again, kind), rtol=0, atol=1e-5,
                                               msg=f"{task} {tensor} {kind}")
                compared += 1
    finally:
        torch.set_num_threads(threads)
    assert compared == 2 * len(TARGETS) * 2  # two tasks, two layers of each target module

    # read at rank 1, the report keeps the build's product errors apart (the factors alone do not give them)
    report = json.loads((copy_at_rank(folder, 1, tmp_path / "rank1") / REPORT).read_text())
    assert report["read_at_rank"] == 1 and set(report["ranks"].values()) == {1}
    assert set(report["relative_error_at_build_rank"]) == set(report["ranks"])
