"""Twin-Merging: exclusive parts, routed batched inference, router, the twin folder and its commands.

Most tests build a twin folder in process (compress_group called directly, no Ray); one end-to-end build runs on
the session's Ray cluster with a full and a LoRA expert and is evaluated through ``distmerge eval``'s runner.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distmerge.errors import ConfigError, InputError
from distmerge.twin.builder import compress_calls, finish_folder, write_exclusive_index
from distmerge.twin.compress import compress_delta, compress_group
from distmerge.twin.config import ExclusiveConfig, load_twin_config
from distmerge.twin.folder import ExclusiveStore, read_manifest
from distmerge.twin.router import prompt_features, train_router
from distmerge.twin.routed import truncate

VOCABS = ((4, 24), (100, 120))  # tiny "tasks": prompts drawn from disjoint parts of the vocabulary


def task_texts(task: int, count: int, seed: int = 0) -> list[str]:
    generator = np.random.default_rng(seed + task)
    lo, hi = VOCABS[task]
    return [" ".join(f"w{t}" for t in generator.integers(lo, hi, size=generator.integers(4, 12)))
            for _ in range(count)]


def write_router_data(root: Path, names: list[str], count: int = 40) -> dict[str, str]:
    paths = {}
    for i, name in enumerate(names):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in task_texts(i, count)))
        paths[name] = str(path)
    return paths


def twin_config(root: Path, base: Path, experts: list, exclusive: dict, router: dict | None = None) -> dict:
    """``experts``: (name, model entry) pairs."""
    names = [name for name, _ in experts]
    return {"base_model": str(base), "models": [{**entry, "name": name} for name, entry in experts],
            "exclusive": exclusive, "out_shard_size": "40KB",
            "router": {"data": write_router_data(root, names), **(router or {})}}


def shared_expert(base: Path, experts: list[Path], out: Path, lam: float = 0.3) -> Path:
    """theta* = base + lam * sum of task vectors (task arithmetic), saved as a model folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    state = model.state_dict()
    others = [AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).state_dict() for p in experts]
    model.load_state_dict({n: v + lam * sum(o[n] - v for o in others) for n, v in state.items()})
    model.save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


def local_twin(root: Path, base: Path, experts: list[Path], exclusive: dict) -> Path:
    """A twin folder built without Ray: the same compress_group and finish_folder as ``twin build``."""
    from distmerge.io.lora import open_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    config = load_twin_config(twin_config(root, base, [(f"t{i}", {"model": str(p)}) for i, p in enumerate(experts)],
                                          exclusive))
    folder = shared_expert(base, experts, root / "twin")
    checkpoints = [open_checkpoint(str(p), f"t{i}") for i, p in enumerate(experts)]
    results = [compress_group(*call) for call in compress_calls(config, folder, checkpoints)]
    write_exclusive_index(folder, config, results)
    features = np.random.default_rng(0).normal(size=(8, 32)).astype(np.float32)
    trained = train_router(features, np.array([0, 1] * 4), list(config.tasks), epochs=1)
    finish_folder(folder, config, results, trained, "in-process test build")
    return folder


@pytest.fixture(scope="module")
def full_rank_twin(tmp_path_factory, llama_family) -> Path:
    base, experts = llama_family
    return local_twin(tmp_path_factory.mktemp("twin_full"), base, experts, {"rank": 10_000, "svd": "exact"})


def load_plain(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def batch_ids(count: int = 3, length: int = 7) -> torch.Tensor:
    return torch.randint(4, 128, (count, length), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------- exclusive parts


def test_full_rank_one_hot_reproduces_each_expert(full_rank_twin, llama_family, tmp_path):
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.twin import load, write_task_model

    _, experts = llama_family
    model = load(full_rank_twin)
    ids = batch_ids(2)
    for t, expert_path in enumerate(experts):
        out = write_task_model(full_rank_twin, f"t{t}", tmp_path / f"t{t}")
        expert, written = Checkpoint(str(expert_path), "expert"), Checkpoint(str(out), "task model")
        assert set(written.tensors) == set(expert.tensors)
        for name in expert.tensors:  # spec §10: full rank and one-hot routing give theta_t back
            torch.testing.assert_close(written.read(name), expert.read(name), rtol=0, atol=2e-6, msg=name)
        model.twin.fixed = torch.nn.functional.one_hot(torch.tensor([t, t]), 2).float()
        with torch.no_grad():
            routed = model(input_ids=ids).logits
            reference = load_plain(expert_path)(input_ids=ids).logits
        torch.testing.assert_close(routed, reference, rtol=0, atol=1e-4)


def test_batched_routing_equals_per_sample_recomposition(tmp_path, llama_family):
    """One batch, three different routings: the factored forward equals theta(x) = theta* + sum_t w_t E_t rebuilt
    per sample and run with functional_call (the reference's way)."""
    from distmerge.twin import load

    base, experts = llama_family
    folder = local_twin(tmp_path, base, experts, {"rank": 3})
    store, shared = ExclusiveStore(folder), load_plain(folder)
    weights = torch.softmax(torch.randn(3, 2, generator=torch.Generator().manual_seed(2)) * 2, dim=-1)
    model = load(folder)
    model.twin.fixed = weights
    ids = batch_ids(3)
    with torch.no_grad():
        batched = model(input_ids=ids).logits
    params = dict(shared.named_parameters())
    for row in range(3):
        recomposed = dict(params)
        for t in range(2):
            for tensor in store.tensors(f"t{t}"):
                recomposed[tensor] = recomposed[tensor] + weights[row, t] * store.part(f"t{t}", tensor).dense()
        with torch.no_grad():
            single = torch.func.functional_call(shared, recomposed, (), {"input_ids": ids[row:row + 1]}).logits
        torch.testing.assert_close(batched[row:row + 1], single, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(batched[0], batched[1], atol=1e-4)  # the routings differ, and so do the outputs


def test_compressed_parts_are_factors_of_the_stated_rank(tmp_path, llama_family):
    base, experts = llama_family
    folder = local_twin(tmp_path, base, experts, {"rank_fraction": 0.25})
    store = ExclusiveStore(folder)
    name = "model.layers.0.mlp.down_proj.weight"  # [32, 72]: rank int(0.25 * 32) = 8
    part = store.part("t1", name)
    assert part.us.shape == (32, 8) and part.v.shape == (72, 8)
    assert store.part("t1", "model.layers.0.input_layernorm.weight").delta.shape == (32,)  # 1-D: kept whole
    assert not any(k.endswith("::dense") for k in store.weight_map)
    delta = load_plain(experts[1]).state_dict()[name] - load_plain(folder).state_dict()[name]
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)  # Eckart-Young: the best rank-8 approximation
    torch.testing.assert_close(part.dense(), (u[:, :8] * s[:8]) @ vh[:8], rtol=0, atol=1e-5)
    # A rank sweep over one build: load(rank=3) keeps the first 3 directions, the rank-3 truncated SVD.
    torch.testing.assert_close(truncate(part, 3).dense(), (u[:, :3] * s[:3]) @ vh[:3], rtol=0, atol=1e-5)
    report = json.loads((folder / "twin_report.json").read_text())
    assert report["ranks"][f"t1::{name}"] == 8


def test_routed_embedding_broadcasts_shared_position_ids():
    """BERT looks up position ids as one [1, seq] row for a batch of 3: each sample still gets its own routed term,
    E(w) = sum_t w_t US_t V_t^T looked up at those positions (hand-built factors, two tasks of rank 1)."""
    from distmerge.twin.routed import RoutedEmbedding, Routing

    table = torch.nn.Embedding(5, 2)
    us = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, 3.0], [1.0, 1.0], [0.0, 0.0]])  # [rows, T r]: task 0, task 1
    v = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # [dim, T r]
    routing = Routing(None, ["a", "b"])
    routing.weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    routed = RoutedEmbedding(table, routing, us, v, torch.tensor([0, 1]))
    positions = torch.tensor([[1, 2]])
    with torch.no_grad():
        out = routed(positions)
    base = table.weight[positions[0]].detach()
    task_a = torch.tensor([[2.0, 0.0], [0.0, 0.0]])  # us[:, 0] at rows 1, 2 times v[:, 0]^T
    task_b = torch.tensor([[0.0, 2.0], [0.0, 6.0]])
    expected = torch.stack([base + task_a, base + task_b, base + 0.5 * (task_a + task_b)])
    torch.testing.assert_close(out, expected)


def test_randomized_svd_error_within_stated_tolerance():
    """README: randomized SVD (oversample 10, 4 power iterations) has a relative Frobenius error at most 0.1% above
    the exact truncated SVD's, on spectra that decay as fine-tuning deltas do (singular values ~ i^-0.7 here)."""
    generator = torch.Generator().manual_seed(3)
    m, n, rank = 300, 1200, 16
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(n, m, generator=generator))
    spectrum = 1.0 / torch.arange(1, m + 1).float() ** 0.7
    delta = (u * spectrum) @ v.T
    errors = {}
    for mode in ("exact", "randomized"):
        part = compress_delta(delta, ExclusiveConfig(rank=rank, svd=mode), seed=5)
        errors[mode] = float(torch.linalg.norm(delta - part.dense()) / torch.linalg.norm(delta))
    assert errors["exact"] <= errors["randomized"] <= errors["exact"] * 1.001
    again = compress_delta(delta, ExclusiveConfig(rank=rank, svd="randomized"), seed=5)
    assert torch.equal(again.us, compress_delta(delta, ExclusiveConfig(rank=rank, svd="randomized"), seed=5).us)


# --------------------------------------------------------------------------------------------- router


def test_router_separates_tiny_tasks(llama_family):
    from transformers import AutoTokenizer

    base, _ = llama_family
    model, tokenizer = load_plain(base), AutoTokenizer.from_pretrained(str(base))
    texts = task_texts(0, 60) + task_texts(1, 60)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    features = prompt_features(model, encoded["input_ids"], encoded["attention_mask"]).numpy()
    labels = np.array([0] * 60 + [1] * 60)
    trained = train_router(features, labels, ["a", "b"], epochs=40, lr=5e-3, batch_size=32, holdout=0.25)
    assert trained.holdout_accuracy >= 0.9 and set(trained.holdout_per_task) == {"a", "b"}
    assert trained.samples == {"a": 60, "b": 60}


def test_features_do_not_depend_on_padding_side(llama_family):
    from transformers import AutoTokenizer

    base, _ = llama_family
    model, tokenizer = load_plain(base), AutoTokenizer.from_pretrained(str(base))
    texts = ["w5 w6 w7 w8 w9", "w70 w71"]
    sides = {}
    for side in ("left", "right"):
        tokenizer.padding_side = side
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        sides[side] = prompt_features(model, encoded["input_ids"], encoded["attention_mask"])
    torch.testing.assert_close(sides["left"], sides["right"], rtol=1e-5, atol=1e-5)


def test_generation_routes_once_per_prompt(full_rank_twin):
    from transformers import AutoTokenizer

    from distmerge.twin import load

    model, tokenizer = load(full_rank_twin), AutoTokenizer.from_pretrained(str(full_rank_twin))
    tokenizer.padding_side = "left"
    encoded = tokenizer(["w5 w6 w7", "w90 w91 w92 w93 w94"], padding=True, return_tensors="pt")
    calls = []
    original = model.twin.router.forward
    model.twin.router.forward = lambda x: calls.append(x.shape) or original(x)
    output = model.generate(**encoded, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape == (2, encoded["input_ids"].shape[1] + 4)
    assert calls == [torch.Size([2, 32])]  # the prompt's routing is reused for every generated token


def test_the_evaluator_loads_a_twin_folder_routed(full_rank_twin):
    """The hook in evaluate/models.py: ``distmerge eval TWIN`` gets the routed model (the runner's actors call the
    same load_model), and the runner's preflight accepts the folder."""
    from distmerge.evaluate import predict, runner
    from distmerge.evaluate.models import ModelSource, load_model, load_tokenizer
    from distmerge.evaluate.tasks import get_task

    source = ModelSource.of(full_rank_twin)
    runner.preflight(source, get_task("perplexity"))
    model = load_model(source, "perplexity")
    assert model.twin.tasks == ["t0", "t1"]
    tokenizer = load_tokenizer(source, "right")
    texts = task_texts(0, 2) + task_texts(1, 2)
    routed = predict.nll(model, tokenizer, texts, 64)[0]
    plain = predict.nll(load_plain(full_rank_twin), tokenizer, texts, 64)[0]
    assert np.isfinite(routed).all() and not np.allclose(routed, plain, rtol=1e-4)  # routing changes the model


# --------------------------------------------------------------------------------------------- bad input


def test_bad_inputs_name_the_key_or_path(tmp_path, llama_family, full_rank_twin):
    from typer.testing import CliRunner

    from distmerge.cli import app

    base, experts = llama_family
    entries = [("a", {"model": str(experts[0])}), ("b", {"model": str(experts[1])})]
    with pytest.raises(ConfigError, match=r"^exclusive\.rank: expected an integer >= 1, got 0$"):
        load_twin_config(twin_config(tmp_path, base, entries, {"rank": 0}))
    with pytest.raises(ConfigError, match=r"^exclusive\.rank_fraction: 1\.5 is out of range \(0, 1\]"):
        load_twin_config(twin_config(tmp_path, base, entries, {"rank_fraction": 1.5}))
    config = twin_config(tmp_path, base, entries, {"rank": 2})
    del config["router"]["data"]["b"]
    with pytest.raises(ConfigError, match=r"^router\.data\.b: missing"):
        load_twin_config(config)
    runner = CliRunner()
    result = runner.invoke(app, ["twin", "task", str(base), "--task", "a", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "is not a twin folder" in result.output and str(base) in result.output
    result = runner.invoke(app, ["twin", "task", str(full_rank_twin), "--task", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--task: 'nope' is not a task" in result.output and "t0, t1" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    with pytest.raises(InputError, match="not a twin folder"):
        read_manifest(base)
    import yaml  # the build command: a bad config is one line naming the key, before Ray starts or a file is written

    (tmp_path / "twin.yaml").write_text(yaml.safe_dump(twin_config(tmp_path, base, entries, {"rank": 0})))
    result = runner.invoke(app, ["twin", "build", str(tmp_path / "twin.yaml"), "--out", str(tmp_path / "built")])
    assert result.exit_code == 2 and "exclusive.rank: expected an integer >= 1, got 0" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "built").exists()
    result = runner.invoke(app, ["twin", "task", str(full_rank_twin), "--task", "t1", "--out", str(tmp_path / "t1")])
    assert result.exit_code == 0 and "exclusive part of 't1'" in result.output
    assert load_plain(tmp_path / "t1") is not None


# --------------------------------------------------------------------------------------------- end to end (Ray)


def make_lora(base: Path, out: Path) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    model = get_peft_model(load_plain(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                                                        init_lora_weights=False))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.1)
    model.save_pretrained(str(out))
    return out


def test_build_end_to_end_with_a_lora_expert(ray_cluster, tmp_path):
    """``twin build`` on 2 Ray workers with a full and a LoRA expert (the default ``product`` parts): the router
    learns, the exclusive parts equal the same groups compressed in this one process (so they do not depend on
    the number of actors), and a LoRA expert's part is the SVD of its product delta."""
    from peft import PeftModel

    from distmerge.io.lora import open_checkpoint
    from distmerge.lora_extract import truncated_svd
    from distmerge.tiny_models import build_family
    from distmerge.twin import build

    # Llama: a tiny Qwen2's word-level tokenizer does not load through AutoTokenizer (transformers 5 forces
    # Qwen2Tokenizer for model_type qwen2); pipelines/twin_qwen.py runs Qwen2 with router.tokenizer.
    base, (full,) = build_family(tmp_path / "family", "llama", experts=1)
    adapter = make_lora(base, tmp_path / "adapter")
    config = twin_config(tmp_path, base, [("full", {"model": str(full)}), ("lora", {"model": str(base),
                                                                                    "lora": str(adapter)})],
                         {"rank": 4}, {"epochs": 40, "lr": 5e-3, "batch_size": 32, "holdout": 0.25})
    result = build(config, tmp_path / "twin", workers=2, progress=False)
    folder = result.out
    assert result.router["holdout_accuracy"] >= 0.9
    assert set(read_manifest(folder)["tasks"]) == {"full", "lora"}

    # The exclusive parts do not depend on the number of actors: the same groups in this one process.
    store = ExclusiveStore(folder)
    experts = [open_checkpoint(str(full), "full"), open_checkpoint(f"{base}+{adapter}", "lora")]
    from safetensors.torch import load_file

    (tmp_path / "again").mkdir()
    for call in compress_calls(load_twin_config(config), folder, experts):
        compress_group(*call[:-1], str(tmp_path / "again"))
    again = {}
    for file in (tmp_path / "again" / "exclusive").glob("*.safetensors"):
        again.update(load_file(str(file)))
    assert set(again) == set(store.weight_map)
    for key, value in again.items():
        assert torch.equal(store.read_key(key), value), key

    # A LoRA expert's exclusive part is the SVD of its product delta (peft's merged weights minus theta*).
    merged = PeftModel.from_pretrained(load_plain(base), str(adapter)).merge_and_unload().state_dict()
    shared = load_plain(folder).state_dict()
    name = "model.layers.1.self_attn.q_proj.weight"
    u, s, v = truncated_svd(merged[name] - shared[name], 4, "exact")
    torch.testing.assert_close(store.part("lora", name).dense(), (u * s) @ v.T, rtol=0, atol=1e-5)



def test_vllm_is_never_used_for_a_twin_folder(tmp_path):
    """vLLM would generate with the shared expert alone: a twin folder always takes the routed transformers path."""
    from distmerge.errors import InputError
    from distmerge.evaluate.models import ModelSource
    from distmerge.evaluate.options import EvalOptions
    from distmerge.evaluate.workers import _use_vllm
    from distmerge.twin.folder import TWIN_JSON

    (tmp_path / TWIN_JSON).write_text("{}")
    source = ModelSource(path=str(tmp_path))
    assert not _use_vllm(EvalOptions(backend="auto"), source, "cuda")
    with pytest.raises(InputError, match="cannot route the twin folder"):
        _use_vllm(EvalOptions(backend="vllm"), source, "cuda")


def test_layer_groups_and_expert_checks_shared_with_adamerging(llama_family_vocab):
    """architectures.group_by_layer and io.checkpoint.check_same_tensors: what Twin and AdaMerging plan with."""
    from distmerge.architectures import group_by_layer
    from distmerge.io.checkpoint import Checkpoint, check_same_tensors
    from distmerge.lora_extract import layer_groups

    names = ["model.layers.1.mlp.up.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.q.weight",
             "model.layers.0.mlp.up.weight", "lm_head.weight"]
    assert group_by_layer(names) == {"model.layers.1": [names[0], names[2]], "model.embed_tokens": [names[1]],
                                     "model.layers.0": [names[3]], "lm_head": [names[4]]}
    assert layer_groups(names) == [[names[4]], [names[1]], [names[3]], [names[0], names[2]]]
    base_path, experts = llama_family_vocab
    base, same, wider = Checkpoint(str(base_path), "base"), Checkpoint(str(experts[0]), "e0"), \
        Checkpoint(str(experts[1]), "e1")
    check_same_tensors(same, base, sorted(base.tensors), "base")
    embedding = "model.embed_tokens.weight"
    with pytest.raises(InputError, match=r"model 'e1', .*tensor 'model.embed_tokens.weight'\: shape \[129, \d+\] "
                                         r"does not match the base's \[128, \d+\]"):
        check_same_tensors(wider, base, [embedding], "base")
    with pytest.raises(InputError, match=r"model 'e0', .*tensor 'extra.weight': missing \(the shared expert has it\)"):
        check_same_tensors(same, base, ["extra.weight"], "shared expert")
