"""End to end: tiny models built here, merged on Ray actors, checked against single-process formulas."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import merge_config
from distmerge import merge
from distmerge.errors import InputError

pytestmark = pytest.mark.usefixtures("ray_cluster")


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


def file_digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*.safetensors"))}


def reference_ties_global(base, experts, density, lam, names):
    """The paper's TIES over the whole model, flat, in one process (spec section 3, reference code)."""
    flat = torch.stack([torch.cat([(e[n].float() - base[n].float()).reshape(-1) for n in names]) for e in experts])
    p = flat.shape[1]
    k = p - int(p * density)
    kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    selected = trimmed * keep
    merged = selected.sum(dim=0) / torch.clamp((selected != 0).sum(dim=0).float(), min=1)
    out, offset = {}, 0
    for n in names:
        size = base[n].numel()
        out[n] = base[n].float() + lam * merged[offset: offset + size].reshape(base[n].shape)
        offset += size
    return out


# Every merge the formula and identity tests read, each written once with 1 and with 4 workers.
CASES = {
    "weight_average": ("weight_average", {}),
    "task_arithmetic": ("task_arithmetic", {"lambda": 0.7}),
    "ties_global": ("ties", {"density": 0.3, "lambda": 1.2}),
    "ties_tensor": ("ties", {"density": 0.4, "trim_scope": "tensor"}),
    "dare_weight_average": ("dare", {"drop_rate": 0.6, "then": "weight_average"}),
    "dare_task_arithmetic": ("dare", {"drop_rate": 0.3, "seed": 5, "lambda": 0.5}),
    "dare_l1": ("dare", {"drop_rate": 0.6, "then": "task_arithmetic", "rescale": "l1"}),
    "dare_ties": ("dare", {"drop_rate": 0.7, "then": "ties", "density": 0.5, "seed": 3}),
    "emr": ("emr", {}),
    # issue 17's methods (della and iso_cts have their own 1-vs-2-worker tests; regmean needs measured statistics)
    "breadcrumbs": ("breadcrumbs", {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "lambda": 0.9}),
    "della_linear": ("della_linear", {"density": 0.6, "epsilon": 0.2, "seed": 4}),
    "model_stock": ("model_stock", {}),
    "slerp": ("slerp", {"t": [0.2, 0.8]}),
    "nuslerp": ("nuslerp", {"nuslerp_flatten": False}),
    "tsv": ("tsv", {}),
    "iso_c": ("iso_c", {}),
}
WORKERS = (1, 4)


@pytest.fixture(scope="module")
def merged(ray_cluster, llama_family, tmp_path_factory) -> dict[tuple[str, int], Path]:
    base, experts = llama_family
    root = tmp_path_factory.mktemp("merged")
    out = {}
    for workers in WORKERS:  # one worker count after the other: each merge reuses the last one's warm workers
        for label, (method, params) in CASES.items():
            out[label, workers] = root / f"{label}-w{workers}"
            result = merge(merge_config(base, experts, method, **params), out[label, workers], workers=workers,
                           progress=False)
            assert result.out == out[label, workers].resolve()
    return out


@pytest.mark.parametrize("label", CASES)
def test_one_and_many_workers_give_identical_files(merged, label):
    one, four = file_digests(merged[label, 1]), file_digests(merged[label, 4])
    assert len(one) > 3 and one == four


def _live_merge_groups() -> list:
    import ray

    return [g for g in ray.util.placement_group_table().values()
            if g["name"].startswith("distmerge-merge") and g["state"] != "REMOVED"]


def test_warm_workers_serve_the_next_merge_and_go_when_other_work_starts(llama_family, tmp_path, monkeypatch):
    import ray

    from distmerge.engine import pool
    from distmerge.engine.ray_session import ray_session

    monkeypatch.setenv(pool.WARM_ENV, "120")
    base, experts = llama_family
    ties = merge_config(base, experts, "ties", density=0.3)
    pool.release_warm_workers()
    first = merge(ties, tmp_path / "a", workers=2, progress=False)
    second = merge(merge_config(base, experts, "emr"), tmp_path / "b", workers=2, progress=False)
    pids = {r["pid"] for r in first.worker_reports}
    assert {r["pid"] for r in second.worker_reports} == pids and len(pids) == 2
    third = merge(ties, tmp_path / "c", workers=2, progress=False)  # after EMR's artifacts: nothing carried over
    assert {r["pid"] for r in third.worker_reports} == pids
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "c")
    assert len(_live_merge_groups()) == 1

    ray.kill(pool._warm.actors[0])  # a warm worker that died meanwhile: the next merge starts fresh ones
    fourth = merge(ties, tmp_path / "d", workers=2, progress=False)
    assert not pids & {r["pid"] for r in fourth.worker_reports}
    assert file_digests(tmp_path / "a") == file_digests(tmp_path / "d")

    with ray_session():  # any other distmerge workload releases them
        assert _live_merge_groups() == []
    monkeypatch.setenv(pool.WARM_ENV, "0.2")
    merge(ties, tmp_path / "e", workers=1, progress=False)
    for _ in range(300):  # the idle timer releases them too
        if not _live_merge_groups():
            break
        time.sleep(0.1)
    assert _live_merge_groups() == []


def test_every_method_loads_and_runs(llama_family, merged):
    from transformers import AutoModelForCausalLM

    base, _ = llama_family
    for label, (method, _) in CASES.items():
        out = merged[label, 4]
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "model.safetensors.index.json", "README.md", "distmerge.yaml", "tokenizer.json",
                "generation_config.json"} <= names
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(load_folder(base))
        assert all((out / f).exists() for f in set(index["weight_map"].values()))
        model = AutoModelForCausalLM.from_pretrained(str(out))
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
        assert logits.shape == (1, 4, 128) and torch.isfinite(logits).all()
        card = (out / "README.md").read_text()
        assert method in card and "e0" in card and "e1" in card


def test_task_arithmetic_matches_formula(llama_family, merged):
    base, experts = llama_family
    b, e0, e1 = load_folder(base), load_folder(experts[0]), load_folder(experts[1])
    got = load_folder(merged["task_arithmetic", 4])
    for name in b:
        expected = b[name] + 0.7 * ((e0[name] - b[name]) + (e1[name] - b[name]))
        torch.testing.assert_close(got[name], expected, rtol=0, atol=1e-6)


def test_weight_average_matches_mean(llama_family, merged):
    base, experts = llama_family
    e0, e1, got = load_folder(experts[0]), load_folder(experts[1]), load_folder(merged["weight_average", 1])
    for name in e0:
        torch.testing.assert_close(got[name], (e0[name] + e1[name]) / 2, rtol=0, atol=1e-6)


def test_ties_global_equals_flat_reference(llama_family, merged):
    base, experts = llama_family
    b = load_folder(base)
    ex = [load_folder(p) for p in experts]
    names = sorted(b)
    expected = reference_ties_global(b, ex, 0.3, 1.2, names)
    got = load_folder(merged["ties_global", 4])
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_global_ties_second_pass_is_answered_from_what_the_first_kept(llama_family, tmp_path, monkeypatch):
    """Where the trim runs its exact passes (no sample here: a GPU, a bf16 merge), the workers keep the first
    pass's irregular keys (this family's task vectors are float32: all of them) and answer the second pass
    without reading: TIES reads the model twice (a pass, the merge), not three times, and the result is the flat
    reference's."""
    from distmerge.methods.generalized import TaskVectorMerge

    monkeypatch.setattr(TaskVectorMerge, "leaves_undecided", lambda self, state: state)
    base, experts = llama_family
    plain = merge(merge_config(base, experts, "task_arithmetic", **{"lambda": 0.5}), tmp_path / "ta", workers=2,
                  progress=False)
    ties = merge(merge_config(base, experts, "ties", density=0.3, **{"lambda": 1.2}), tmp_path / "ties", workers=2,
                 progress=False)
    assert ties.bytes_read == 2 * plain.bytes_read
    b, ex = load_folder(base), [load_folder(p) for p in experts]
    expected = reference_ties_global(b, ex, 0.3, 1.2, sorted(b))
    got = load_folder(tmp_path / "ties")
    for name in sorted(b):
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)


def test_dare_masks_follow_the_seed(llama_family, merged, tmp_path):
    """The same seed gives the same masks under any placement (the 1-vs-4 identity above); another seed others."""
    base, experts = llama_family
    other = tmp_path / "dare-seed6"
    merge(merge_config(base, experts, "dare", drop_rate=0.3, seed=6, **{"lambda": 0.5}), other, workers=2,
          progress=False)
    name = "model.layers.0.mlp.up_proj.weight"
    five = load_folder(merged["dare_task_arithmetic", 1])
    assert torch.equal(five[name], load_folder(merged["dare_task_arithmetic", 4])[name])
    assert not torch.equal(five[name], load_folder(other)[name])


def test_dare_task_arithmetic_matches_formula(llama_family, merged):
    from distmerge.ops.dare import keep_mask

    base, experts = llama_family
    b, ex, got = load_folder(base), [load_folder(p) for p in experts], load_folder(merged["dare_task_arithmetic", 4])
    for name in b:
        delta = torch.zeros_like(b[name])
        for i, e in enumerate(ex):
            tau = e[name] - b[name]
            keep = keep_mask(0.3, 5, f"e{i}", name, tau.numel(), 0, tau.numel()).reshape(tau.shape)
            delta += tau * keep / 0.7
        torch.testing.assert_close(got[name], b[name] + 0.5 * delta, rtol=0, atol=1e-6)


def test_emr_task_models_match_reference(llama_family, merged, tmp_path):
    from distmerge.emr_task import materialize_task

    base, experts = llama_family
    out = merged["emr", 4]
    b, ex = load_folder(base), [load_folder(p) for p in experts]
    names = sorted(b)
    taus = {n: torch.stack([e[n] - b[n] for e in ex]) for n in names}
    flags = {n: torch.where(taus[n].mean(0) > 0, 1.0, -1.0) for n in names}
    masks = {n: taus[n] * flags[n] > 0 for n in names}
    unified = {n: (taus[n].abs() * masks[n]).amax(0) * flags[n] for n in names}
    scales = [sum(taus[n][t].abs().mean() for n in names) / sum((unified[n] * masks[n][t]).abs().mean() for n in names)
              for t in range(2)]
    meta = json.loads((out / "emr" / "index.json").read_text())["metadata"]
    assert meta["tasks"] == ["e0", "e1"]
    for t, task in enumerate(("e0", "e1")):
        assert meta["rescalers"][t] == pytest.approx(float(scales[t]), rel=1e-5)
        task_dir = materialize_task(out, task, tmp_path / f"task-{task}")
        got = load_folder(task_dir)
        for n in names:
            expected = b[n] + scales[t] * unified[n] * masks[n][t]
            torch.testing.assert_close(got[n], expected.float(), rtol=0, atol=1e-5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "task-e0"))


def test_emr_single_task_reproduces_the_expert(llama_family, tmp_path):
    from distmerge.emr_task import materialize_task

    base, experts = llama_family
    out = tmp_path / "emr1"
    merge(merge_config(base, experts[:1], "emr"), out, workers=2, progress=False)
    meta = json.loads((out / "emr" / "index.json").read_text())["metadata"]
    assert meta["rescalers"][0] == pytest.approx(1.0, rel=1e-6)
    got = load_folder(materialize_task(out, "e0", tmp_path / "t"))
    for name, value in load_folder(experts[0]).items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)


def test_vocab_mismatch_is_reconciled(llama_family_vocab, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, experts = llama_family_vocab
    b, e0, e1 = load_folder(base), load_folder(experts[0]), load_folder(experts[1])
    assert e1["model.embed_tokens.weight"].shape[0] == 129

    # tokenizer: base -> the base's 128 rows; the expert's extra row is dropped
    out = tmp_path / "base-vocab"
    merge(merge_config(base, experts, "task_arithmetic"), out, workers=2, progress=False)
    got = load_folder(out)
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(got[emb], b[emb] + (e0[emb] - b[emb]) + (e1[emb][:128] - b[emb]), rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 128

    # tokenizer: e1 -> 129 rows; the base and e0 get the new row from the mean of their rows (MergeLM's rule)
    config = merge_config(base, experts, "task_arithmetic")
    config["tokenizer"] = "e1"
    out = tmp_path / "e1-vocab"
    merge(config, out, workers=2, progress=False)
    got = load_folder(out)
    assert got[emb].shape[0] == 129 and got["lm_head.weight"].shape[0] == 129
    base_new, e0_new = b[emb].mean(0), e0[emb].mean(0)
    expected_new = base_new + (e0_new - base_new) + (e1[emb][128] - base_new)
    torch.testing.assert_close(got[emb][128], expected_new, rtol=0, atol=1e-5)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 129
    assert len(AutoTokenizer.from_pretrained(str(out))) == 129
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model(torch.tensor([[1, 128]])).logits.shape[-1] == 129


def test_union_tokenizer(llama_family_vocab, tmp_path):
    from transformers import AutoTokenizer

    base, experts = llama_family_vocab
    config = merge_config(base, experts, "task_arithmetic")
    config["tokenizer"] = "union"
    out = tmp_path / "union"
    merge(config, out, workers=2, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    pad_id = tokenizer.convert_tokens_to_ids("[PAD]")
    assert pad_id == 128
    got, e1, b = load_folder(out), load_folder(experts[1]), load_folder(base)
    emb = "model.embed_tokens.weight"
    assert got[emb].shape[0] == 129
    # [PAD] row: the base and e0 contribute their mean rows, e1 its own row
    e0 = load_folder(experts[0])
    expected = b[emb].mean(0) + (e0[emb].mean(0) - b[emb].mean(0)) + (e1[emb][128] - b[emb].mean(0))
    torch.testing.assert_close(got[emb][pad_id], expected, rtol=0, atol=1e-5)


@pytest.fixture(scope="module", params=["qwen2", "roberta"])
def other_family(request, tmp_path_factory):
    from distmerge.tiny_models import build_family

    return request.param, build_family(tmp_path_factory.mktemp(request.param), request.param, experts=3)


# One method of each kind: per-chunk, a model-wide reduction pass with deferred patches, artifacts.
@pytest.mark.parametrize("method,params", [("task_arithmetic", {"lambda": 0.4}), ("ties", {"density": 0.3}),
                                           ("emr", {})])
def test_other_architectures(other_family, method, params, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    arch, (base, experts) = other_family
    config = merge_config(base, experts, method, **params)
    config["exclude"] = [".*classifier.*"]
    out = tmp_path / "merged"
    merge(config, out, workers=2, progress=False)
    b, got = load_folder(base), load_folder(out)
    if arch == "roberta":
        for name in b:
            if "classifier" in name:
                assert torch.equal(got[name], b[name])
        model = AutoModelForSequenceClassification.from_pretrained(str(out))
        assert model(torch.tensor([[0, 5, 6, 2]])).logits.shape == (1, 3)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(out))
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_tied_embeddings_stay_tied(tmp_path):
    from transformers import AutoModelForCausalLM

    from distmerge.tiny_models import build_family

    base, experts = build_family(tmp_path / "models", "llama", experts=2, tie=True)
    out = tmp_path / "merged"
    merge(merge_config(base, experts, "task_arithmetic"), out, workers=2, progress=False)
    got = load_folder(out)
    assert "lm_head.weight" not in got
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_bin_checkpoints_and_single_files(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    base, experts = llama_family
    bin_expert = tmp_path / "expert_bin"
    AutoModelForCausalLM.from_pretrained(str(experts[1])).save_pretrained(str(bin_expert), safe_serialization=False)
    if not list(bin_expert.glob("*.bin")):  # newer transformers only write safetensors: write the .bin by hand
        torch.save(load_folder(experts[1]), bin_expert / "pytorch_model.bin")
        for f in bin_expert.glob("*.safetensors*"):
            f.unlink()
    single = tmp_path / "expert0.safetensors"
    save_file(load_folder(experts[0]), str(single))
    out = tmp_path / "merged"
    merge(merge_config(base, [single, bin_expert], "task_arithmetic"), out, workers=2, progress=False)
    reference = tmp_path / "reference"
    merge(merge_config(base, experts, "task_arithmetic"), reference, workers=2, progress=False)
    got, expected = load_folder(out), load_folder(reference)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)


def test_out_dtype_and_resolved_config_reproduces(llama_family, tmp_path):
    base, experts = llama_family
    config = merge_config(base, experts, "ties", density=0.4)
    config["out_dtype"] = "bfloat16"
    out = tmp_path / "bf16"
    merge(config, out, workers=2, progress=False)
    got = load_folder(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    written = json.loads((out / "config.json").read_text())
    dtype_keys = {k: written[k] for k in ("dtype", "torch_dtype") if k in written}
    assert dtype_keys and set(dtype_keys.values()) == {"bfloat16"}, dtype_keys
    again = tmp_path / "again"
    merge(out / "distmerge.yaml", again, workers=3, progress=False)
    assert file_digests(out) == file_digests(again)


def test_ties_global_majority_sign_patches_written_shards(tmp_path):
    """Exact cancellations with a negative model-wide majority: the shards are patched after the merge."""
    import yaml
    g = torch.Generator().manual_seed(11)
    shapes = {"model.layers.0.mlp.w": (16, 8), "model.layers.1.mlp.w": (16, 8), "model.norm.weight": (8,)}
    # values on coarse grids so that (base + tau) - base == tau exactly in float32
    base = {n: torch.round(torch.randn(s, generator=g) * 64) / 64 for n, s in shapes.items()}
    tau_a = {n: torch.round(torch.randn(s, generator=g) * 4096) / 4096 - 0.004 for n, s in shapes.items()}
    tau_b = {n: torch.where(torch.rand(s, generator=g) < 0.3, -tau_a[n], torch.round(torch.randn(s, generator=g) * 4096) / 4096 - 0.004)
             for n, s in shapes.items()}
    paths = []
    for label, tensors in (("base", base), ("a", {n: base[n] + tau_a[n] for n in base}),
                           ("b", {n: base[n] + tau_b[n] for n in base})):
        folder = tmp_path / label
        folder.mkdir()
        save_file(tensors, str(folder / "model.safetensors"))
        paths.append(folder)
    out = tmp_path / "out"
    merge(merge_config(paths[0], paths[1:], "ties", density=0.9), out, workers=2, progress=False)
    names = sorted(base)
    ex = [load_folder(p) for p in paths[1:]]
    expected = reference_ties_global(base, ex, 0.9, 1.0, names)
    got = load_folder(out)
    for name in names:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6)
    card = (out / "README.md").read_text()
    state = yaml.safe_load(card.split("## Computed during the merge")[1].split("```yaml")[1].split("```")[0])
    assert state["majority_sign"] == -1 and state["patched_elements"] > 0


@pytest.mark.parametrize("estimate", ["guess", "bracket", "missed"])
def test_a_sampled_trim_writes_the_exact_passes_merge(tmp_path, estimate, monkeypatch):
    """Global TIES on the engine starts from a sample's estimates of the thresholds (a guess on bf16 inputs, a
    bracket on float32 ones: its undecided elements travel beside the shards and are merged in the driver; one
    that misses merges again from the exact passes): the files are the exact merge's, bit for bit."""
    from test_methods_generalized import _sampled_family

    from distmerge.methods import build_method, execute, generalized
    from distmerge.ops import ties as ties_ops

    if estimate == "missed":
        far = ties_ops.high_bin_of(1000.0) << 16
        monkeypatch.setattr(generalized, "_bracket", lambda *a: [far, far])
    base, experts = _sampled_family(9, grid=estimate != "bracket")
    stored = torch.bfloat16 if estimate != "bracket" else torch.float32  # grid values are bf16 values
    rename = {name: f"model.layers.{i}.mlp.w" for i, name in enumerate(sorted(base))}
    paths = []
    for label, tensors in (("base", base), *((f"e{t}", e) for t, e in enumerate(experts))):
        (tmp_path / label).mkdir()
        save_file({rename[n]: v.to(stored) for n, v in tensors.items()}, str(tmp_path / label / "model.safetensors"))
        paths.append(tmp_path / label)
    params = {"density": 0.15, "lambda": 0.9}
    result = merge(merge_config(paths[0], paths[1:], "ties", **params), tmp_path / "out", workers=2, progress=False)
    expected, _ = execute.merge_tensor_dicts(build_method("ties", {"trim_scope": "global", **params}), base, experts)
    got = load_folder(tmp_path / "out")
    for name, value in expected.items():
        assert torch.equal(got[rename[name]].view(torch.int16 if stored == torch.bfloat16 else torch.int32),
                           value.to(stored).view(torch.int16 if stored == torch.bfloat16 else torch.int32)), name
    want = "missed: merged again from exact passes" if estimate == "missed" else [estimate] * 3
    assert result.method_state["trim_estimates"] == want
    assert not (tmp_path / "out" / ".undecided").exists() and not (tmp_path / "out" / ".patches").exists()


def _recast_family(source: Path, target: Path, cast) -> Path:
    """A copy of a model folder, shard for shard, with ``cast`` applied to every tensor."""
    import shutil

    target.mkdir(parents=True)
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            with safe_open(str(file), "pt") as f:
                save_file({k: cast(f.get_tensor(k)).contiguous() for k in f.keys()}, str(target / file.name),
                          metadata={"format": "pt"})
        else:
            shutil.copy(file, target / file.name)
    return target


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.4}), ("dare", {"drop_rate": 0.5, "lambda": 0.8}),
                                           ("task_arithmetic", {"lambda": 0.6}), ("weight_average", {})])
def test_bf16_inputs_handed_to_the_loops_as_read_give_the_widened_merge(llama_family, tmp_path, method, params):
    """TIES, DARE, task-arithmetic and weight-average workers hand bf16 chunks to loops that widen them block by block: the float32 merge of a
    bf16 family is bit for bit the merge of the same values stored in float32, bf16 and float32 inputs mixed
    included; a NaN in a bf16 input still names its file and tensor."""
    from distmerge.engine.worker import widening_method
    from distmerge.methods import build_method

    base, experts = llama_family
    folders = [base, *experts]
    bf16 = [_recast_family(f, tmp_path / "bf16" / f.name, lambda t: t.bfloat16()) for f in folders]
    widened = [_recast_family(f, tmp_path / "f32" / f.name, lambda t: t.bfloat16().float()) for f in folders]
    built = build_method(method, params)
    assert widening_method(built, torch.float32, torch.device("cpu")) is not None  # the workers do widen
    assert widening_method(built, torch.bfloat16, torch.device("cpu")) is None

    def run(family, name):
        config = merge_config(family[0], family[1:], method, **params)
        config["out_dtype"] = "float32"
        merge(config, tmp_path / name, workers=2, progress=False)
        return load_folder(tmp_path / name)

    want = run(widened, "from-f32")
    for name, family in (("from-bf16", bf16), ("mixed", [widened[0], bf16[1], widened[2]])):
        got = run(family, name)
        assert set(got) == set(want)
        for tensor in want:
            assert torch.equal(got[tensor].view(torch.int32), want[tensor].view(torch.int32)), (name, tensor)

    poisoned = "model.layers.1.mlp.up_proj.weight"
    shard = next(f for f in (tmp_path / "bf16" / experts[0].name).glob("*.safetensors")
                 if poisoned in safe_open(str(f), "pt").keys())
    with safe_open(str(shard), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[poisoned][2, 3] = float("inf")
    save_file(tensors, str(shard), metadata={"format": "pt"})
    with pytest.raises(InputError, match=rf"model 'e0', file '.*{shard.name}', tensor '{poisoned}': contains NaN"):
        run(bf16, "poisoned")
