"""AdaMerging: the functional model and objective without Ray, then one Ray Train job (2 FSDP2 workers, merged
per layer) that checks the sharded gradients against a plain single-process computation, the written merges,
and resumption after a killed worker."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from distmerge.errors import ConfigError

TASKS = ("alpha", "beta")
ROWS = 8  # rows per task: one step of batches x batch_size = 2 x 4, so every step sees every row
HEADS = r".*classifier.*"


# --- fixtures: a tiny RoBERTa family whose heads are confident enough for the entropy to move ------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification

    from distmerge.tiny_models import build_family

    root = tmp_path_factory.mktemp("ada")
    base, experts = build_family(root / "models", "roberta", experts=2, hidden=32, layers=1, delta_scale=0.05,
                                 shard_size="100KB")
    for i, folder in enumerate(experts):
        model = AutoModelForSequenceClassification.from_pretrained(str(folder))
        generator = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            model.classifier.out_proj.weight.copy_(torch.randn(model.classifier.out_proj.weight.shape,
                                                               generator=generator) * 3.0)
        model.save_pretrained(str(folder), max_shard_size="100KB")
    rng = np.random.default_rng(0)
    data = {}
    for t, task in enumerate(TASKS):
        rows = [{"sentence": " ".join(f"w{w}" for w in rng.integers(4, 128, size=6)), "label": int(rng.integers(3))}
                for _ in range(ROWS)]
        data[task] = rows
        _write_jsonl(root / f"{task}.jsonl", rows)
        corrupted = [{**r, "label": f"garbage-{j}"} for j, r in enumerate(rows)]  # not even a number
        _write_jsonl(root / f"{task}-corrupted.jsonl", corrupted)
    return {"root": root, "base": str(base), "experts": {t: str(p) for t, p in zip(TASKS, experts)}, "data": data}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def ada_config(family, **overrides) -> dict:
    suffix = overrides.pop("data_suffix", "")
    config = {"base": family["base"], "experts": family["experts"],
              "data": {t: {"path": str(family["root"] / f"{t}{suffix}.jsonl"), "fields": ["sentence"]} for t in TASKS},
              "batches": 2, "batch_size": 4, "steps": 1, "max_length": 16, "checkpoint_every": 1}
    config.update(overrides)
    return config


def prepared(family, **overrides):
    from distmerge.adamerging.driver import prepare

    return prepare(ada_config(family, **overrides))


# --- the plain reference: full state dicts, the formula written out, no bank, no sharding --------------------


def state(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def reference_task_vectors(family, plus: bool, density: float = 0.2):
    base = state(family["base"])
    names = sorted(n for n in base if base[n].is_floating_point() and "classifier" not in n)
    taus = [{n: state(family["experts"][t])[n].float() - base[n].float() for n in names} for t in TASKS]
    if plus:  # the reference's ties_merging_split: global flatten, topk_values_mask, mass sign, split
        flat = torch.stack([torch.cat([tau[n].reshape(-1) for n in names]) for tau in taus])
        k = flat.shape[1] - int(flat.shape[1] * density)
        kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
        trimmed = flat * (flat.abs() >= kth)
        sign = torch.sign(trimmed.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        selected = trimmed * torch.where(sign > 0, trimmed > 0, trimmed < 0)
        offset, split = 0, [{} for _ in TASKS]
        for n in names:
            size = base[n].numel()
            for t in range(len(TASKS)):
                split[t][n] = selected[t, offset:offset + size].reshape(base[n].shape)
            offset += size
        taus = split
    return base, names, taus


def reference_gradient(family, granularity: str, plus: bool) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base, names, taus = reference_task_vectors(family, plus)
    rows = len(names) if granularity == "layer" else 1
    raw = torch.full((rows, len(TASKS)), 0.3, requires_grad=True)
    lam = raw.clamp(0, 1)
    merged = {n: base[n] + sum(lam[i if granularity == "layer" else 0, t] * taus[t][n] for t in range(len(TASKS)))
              for i, n in enumerate(names)}
    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    total = 0.0
    for t, task in enumerate(TASKS):
        model = AutoModelForSequenceClassification.from_pretrained(family["experts"][task]).eval()
        params = {**{n: p.detach() for n, p in model.named_parameters()}, **merged}
        texts = [r["sentence"] for r in family["data"][task]]
        encoded = dict(tokenizer(texts, padding=True, truncation=True, max_length=16, return_tensors="pt"))
        encoded.pop("token_type_ids", None)
        logits = torch.func.functional_call(model, params, args=(), kwargs=encoded).logits
        p = logits.softmax(-1)
        total = total + (-(p * logits.log_softmax(-1)).sum(-1)).sum() / 4  # batch_size 4, mean per batch, summed
    total.backward()
    return raw.grad


# --- Ray-free -------------------------------------------------------------------------------------


def test_config_errors_name_the_key(family):
    from distmerge.adamerging.config import load_ada_config

    good = ada_config(family)
    for change, key in (({"granularity": "tensor"}, "granularity"), ({"lambda_init": 1.5}, "lambda_init"),
                        ({"steps": -1}, "steps"), ({"freeze": ["("]}, "freeze[0]"), ({"colour": 1}, "colour"),
                        ({"data": {"alpha": "x.csv", "beta": "y.jsonl"}}, "data.alpha.path"),
                        ({"data": {"alpha": "x.jsonl"}}, "data.beta")):
        with pytest.raises(ConfigError, match=rf"^{key.replace('[', '.').replace(']', '.')}"):
            load_ada_config({**good, **change})


def test_freeze_first_layers_keeps_the_first_fraction_of_layers_at_lambda_init(llama_family, family):
    """``freeze_first_layers: f`` (FusionBench's Llama AdaMerging freezes the first 30%): the tensors of the first
    int(f x layers) layers get no coefficient row; embeddings, norm and head, outside the layers, still do."""
    from distmerge.adamerging.bank import plan_tensors
    from distmerge.adamerging.config import load_ada_config
    from distmerge.architectures import layer_of
    from distmerge.io.checkpoint import Checkpoint

    base, experts = llama_family  # 3 layers
    opened = {f"t{i}": Checkpoint(str(p), f"t{i}") for i, p in enumerate(experts)}
    for fraction, first_trained in ((0.0, 0), (0.34, 1), (0.3, 0), (0.7, 2)):
        plan = plan_tensors(Checkpoint(str(base), "base"), opened, (), (), "layer", fraction)
        for name, row in zip(plan.names, plan.rows):
            layer = layer_of(name)[1]
            assert (row is None) == (layer is not None and layer < first_trained), (fraction, name)
    good = ada_config(family)
    assert load_ada_config({**good, "freeze_first_layers": 0.3}).freeze_first_layers == 0.3
    with pytest.raises(ConfigError, match=r"^freeze_first_layers"):
        load_ada_config({**good, "freeze_first_layers": 1.0})
    # an unset fraction leaves the run key (the resume folder's name) as it was before the key existed
    assert "freeze_first_layers" not in load_ada_config(good).to_dict()


def test_functional_model_matches_the_formula_and_plus_matches_the_reference(family):
    """The bank (one process) gives theta0 + sum_t lambda_t tau_t, with AdaMerging++'s selected entries as the
    reference computes them; the frozen tensors keep lambda_init."""
    from distmerge.adamerging.train import build_setup

    config = prepared(family, plus=True, granularity="layer", freeze=["embeddings"])
    setup = build_setup(config)
    base, names, taus = reference_task_vectors(family, plus=True)
    assert list(setup.plan.names) == names
    with torch.no_grad():
        setup.coefficients.raw.uniform_(-0.5, 1.5, generator=torch.Generator().manual_seed(0))
        merged = setup.bank.merged(setup.coefficients)
        lam = setup.coefficients.per_tensor()
    frozen = [i for i, n in enumerate(names) if "embeddings" in n]
    assert frozen and all(setup.plan.rows[i] is None for i in frozen)
    assert torch.all(lam[frozen] == 0.3) and lam.min() >= 0 and lam.max() <= 1 and (lam == 0).any()
    for i, n in enumerate(names):
        expected = base[n] + sum(lam[i, t] * taus[t][n] for t in range(len(TASKS)))
        torch.testing.assert_close(merged[n], expected, atol=1e-6, rtol=0)
    kept = sum(int((taus[t][n] != 0).sum()) for t in range(len(TASKS)) for n in names)
    assert 0 < kept < 0.2 * len(TASKS) * sum(base[n].numel() for n in names) + len(TASKS)


def test_objective_ignores_labels_and_gradients_match_the_reference(family):
    """One process: the step's coefficient gradient equals the plain computation; the labels are not an input."""
    from distmerge.adamerging.train import build_setup, encode_rows, step_objective

    config = prepared(family, granularity="layer")
    setup = build_setup(config)
    batches = {t: [encode_rows(setup, t, {"sentence": np.array([r["sentence"] for r in family["data"][t][b:b + 4]])})
                   for b in (0, 4)] for t in TASKS}
    step_objective(setup, batches, 4).backward()
    torch.testing.assert_close(setup.coefficients.raw.grad, reference_gradient(family, "layer", False),
                               atol=1e-6, rtol=0)


def test_a_lora_expert_trains_as_its_merged_model(family, tmp_path):
    """An expert given as a PEFT LoRA adapter on the base (each form a merge config takes) gives the same bank,
    heads and first-step gradient as peft's merge_and_unload() of it saved as a plain folder."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from distmerge.adamerging.train import build_setup, encode_rows, step_objective

    torch.manual_seed(7)
    model = AutoModelForSequenceClassification.from_pretrained(family["base"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_rslora=True,
                                                  target_modules=["query", "value", "dense"],
                                                  modules_to_save=["classifier"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 3.0)  # a confident head of its own
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    dense = tmp_path / "dense"
    peft_model.merge_and_unload().save_pretrained(str(dense))

    def gradient_and_bank(experts):
        setup = build_setup(prepared(family, granularity="layer", experts=experts))
        batches = {t: [encode_rows(setup, t, {"sentence": np.array([r["sentence"] for r in family["data"][t][:4]])})]
                   for t in TASKS}
        step_objective(setup, batches, 4).backward()
        bank = {k: v.detach().clone() for k, v in setup.bank.state_dict().items()}
        return setup.coefficients.raw.grad.clone(), bank, setup.heads

    want = gradient_and_bank({"alpha": str(dense), "beta": family["experts"]["beta"]})
    assert want[1] and want[2]["alpha"]
    untouched = gradient_and_bank({"alpha": family["base"], "beta": family["experts"]["beta"]})
    assert not torch.allclose(untouched[0], want[0], atol=1e-4)  # the adapter's delta moves the gradient
    forms = [{"alpha": f"{family['base']}+{adapter}", "beta": family["experts"]["beta"]},
             [{"name": "alpha", "model": family["base"], "lora": str(adapter)},
              {"name": "beta", "model": family["experts"]["beta"]}],
             {"alpha": str(adapter), "beta": family["experts"]["beta"]}]  # the adapter alone, on the config's base
    for experts in forms:
        gradient, bank, heads = gradient_and_bank(experts)
        torch.testing.assert_close(gradient, want[0], atol=1e-6, rtol=0)
        assert bank.keys() == want[1].keys()
        for key in bank:
            torch.testing.assert_close(bank[key], want[1][key], atol=1e-6, rtol=0)
        for key in want[2]["alpha"]:
            torch.testing.assert_close(heads["alpha"][key], want[2]["alpha"][key], atol=1e-6, rtol=0)


@pytest.mark.parametrize("objective", ["entropy", "sft"])
def test_causal_lm_objectives_match_the_formula(llama_family, tmp_path, objective):
    """Causal LMs, one process: the step's coefficient gradient equals the formula written out, for each prompt's
    mean next-token entropy over its attended positions (``entropy``) and for its mean cross-entropy over the
    target's tokens only (``sft``, FusionBench's Llama variant: prompt and padding positions are not targets)."""
    from transformers import AutoModelForCausalLM

    from distmerge.adamerging.train import build_setup, encode_rows, step_objective

    base, experts = llama_family
    rows = {task: [{"prompt": " ".join(f"w{(5 * i + 3 * j + k) % 100 + 4}" for j in range(2 + i % 3)),
                    "answer": f"w{(7 * i + k) % 100 + 4} w{(11 * i + k) % 100 + 4}"} for i in range(4)]
            for k, task in enumerate(TASKS)}
    for task in TASKS:
        _write_jsonl(tmp_path / f"{task}.jsonl", rows[task])
    sft = objective == "sft"
    config = prepared({"base": str(base), "experts": dict(zip(TASKS, map(str, experts))), "root": tmp_path},
                      objective=objective, batches=1, max_length=32,
                      data={t: {"path": str(tmp_path / f"{t}.jsonl"), "fields": ["prompt"],
                                **({"target": "answer"} if sft else {})} for t in TASKS})
    setup = build_setup(config)
    assert config.kind == "causal"
    columns = ("prompt", "answer") if sft else ("prompt",)
    batches = {t: [encode_rows(setup, t, {c: np.array([r[c] for r in rows[t]]) for c in columns})] for t in TASKS}
    step_objective(setup, batches, 4).backward()

    base_state, names = state(str(base)), list(setup.plan.names)
    taus = [{n: state(str(p))[n].float() - base_state[n].float() for n in names} for p in experts]
    raw = torch.full((len(names), len(TASKS)), 0.3, requires_grad=True)
    lam = raw.clamp(0, 1)
    merged = {n: base_state[n] + sum(lam[i, t] * taus[t][n] for t in range(len(TASKS))) for i, n in enumerate(names)}
    model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    params = {**{n: p.detach() for n, p in model.named_parameters()}, **merged}
    total = 0.0
    for task in TASKS:
        encoded = batches[task][0]
        logits = torch.func.functional_call(model, params, args=(), kwargs={
            "input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}).logits
        if sft:
            labels = encoded["labels"]
            prompts = setup.tokenizer([r["prompt"] for r in rows[task]])["input_ids"]
            for i, prompt in enumerate(prompts):  # no prompt token is a target; every row has target tokens
                assert (labels[i, :len(prompt)] == -100).all() and (labels[i] >= 0).any()
            assert (labels[encoded["attention_mask"] == 0] == -100).all()
            per_sample = []
            for i in range(labels.shape[0]):
                positions = [j for j in range(1, labels.shape[1]) if labels[i, j] >= 0]
                losses = [-logits[i, j - 1].log_softmax(-1)[labels[i, j]] for j in positions]
                per_sample.append(sum(losses) / len(losses))
            total = total + sum(per_sample) / 4
        else:
            mask = encoded["attention_mask"].float()
            entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
            total = total + ((entropy * mask).sum(-1) / mask.sum(-1)).sum() / 4
    total.backward()
    torch.testing.assert_close(setup.coefficients.raw.grad, raw.grad, atol=1e-6, rtol=0)
    assert raw.grad.abs().max() > 0


def test_weight_filters_resolve_each_tensor_to_its_own_value():
    from distmerge.adamerging.driver import weight_filters
    from distmerge.config import resolve_setting

    lambdas = {"a.layer.1.w": {"x": 0.1}, "a.layer.11.w": {"x": 0.2}, "b.a.layer.1.w": {"x": 0.3}, "w": {"x": 0.4}}
    filters = weight_filters(lambdas, "x")
    assert {n: resolve_setting(filters, n, 0.0) for n in lambdas} == {n: v["x"] for n, v in lambdas.items()}


# --- Ray Train: one job of every variant; one dies mid-way and its worker group restarts ------------------------


VARIANTS = {  # name -> config overrides; "resume"'s rank 0 dies after 2 steps (fault injection)
    "task": {"granularity": "task"},
    "plus": {"granularity": "layer", "plus": True},
    "zero": {"steps": 0},
    "layer": {"granularity": "layer", "steps": 3, "lr": 0.1},
    "corrupted": {"granularity": "layer", "steps": 3, "lr": 0.1, "data_suffix": "-corrupted"},
    "deepspeed": {"granularity": "layer", "plus": True, "strategy": "deepspeed"},  # ZeRO-3, no op build
    "resume": {"granularity": "layer", "steps": 3, "lr": 0.1, "strategy": "deepspeed"},  # == "layer" under FSDP2
}


@pytest.fixture(scope="module")
def trained(family, ray_cluster, tmp_path_factory):
    """One Train job of every variant; "resume"'s rank 0 dies after 2 of its 3 steps, Ray Train restarts the
    worker group (max_failures=1), which skips the finished variants and resumes from the last checkpoint."""
    from distmerge.adamerging.driver import train

    folder = tmp_path_factory.mktemp("ada_runs")
    variants = [(prepared(family, **overrides), folder / name) for name, overrides in VARIANTS.items()]
    os.environ["DISTMERGE_FAULT_INJECT"] = f"adamerging_exit_after_steps=2@{len(variants) - 1}"
    try:
        results = dict(zip(VARIANTS, train(variants, folder / "ray", workers=2, max_failures=1)))
    finally:
        os.environ.pop("DISTMERGE_FAULT_INJECT")
    return {"results": results, "variants": dict(zip(VARIANTS, (c for c, _ in variants))), "folder": folder}


@pytest.mark.timeout(900)  # the module's Train job runs in this test's setup
@pytest.mark.parametrize("name,granularity,plus", [("task", "task", False), ("layer", "layer", False),
                                                   ("plus", "layer", True), ("deepspeed", "layer", True)])
def test_sharded_gradients_equal_one_process(trained, family, name, granularity, plus):
    gradient = trained["results"][name]["tensors"]["first_gradient"]
    torch.testing.assert_close(gradient, reference_gradient(family, granularity, plus), atol=1e-6, rtol=0)


def test_objective_decreases_within_bounds_and_labels_are_never_read(trained):
    learn, corrupted = trained["results"]["layer"], trained["results"]["corrupted"]
    history = learn["history"]
    assert len(history) == 3 and all(b < a for a, b in zip(history, history[1:])), history
    lambdas = learn["tensors"]["lambdas"]
    assert lambdas.min() >= 0.0 and lambdas.max() <= 1.0 and not torch.all(lambdas == 0.3)
    np.testing.assert_allclose(corrupted["history"], history, rtol=1e-6)  # rows may reach the ranks in another order
    torch.testing.assert_close(corrupted["tensors"]["raw"], learn["tensors"]["raw"], atol=1e-6, rtol=0)


def test_resume_after_a_killed_worker_equals_an_uninterrupted_run(trained):
    resumed, uninterrupted = trained["results"]["resume"], trained["results"]["layer"]
    # from step 2, the last checkpoint on disk, though rank 0 dies before Ray Train's controller may have heard of it
    assert resumed["steps"] == 3 and resumed["resumed_from"] == 2
    torch.testing.assert_close(resumed["tensors"]["raw"], uninterrupted["tensors"]["raw"], atol=1e-6, rtol=0)
    torch.testing.assert_close(resumed["tensors"]["adam.exp_avg_sq"], uninterrupted["tensors"]["adam.exp_avg_sq"],
                               atol=1e-9, rtol=1e-5)
    np.testing.assert_allclose(resumed["history"], uninterrupted["history"], rtol=1e-6)


def test_resume_after_a_killed_driver_equals_an_uninterrupted_run(trained, family, tmp_path):
    """``distmerge adamerging`` killed (os._exit, its embedded Ray with it) once step 2's checkpoint is on disk;
    the same command again resumes there and learns what the uninterrupted run ("layer") learned."""
    import subprocess
    import sys

    import yaml

    from distmerge.adamerging.driver import lambdas_by_tensor, run
    from distmerge.engine import faults

    path = tmp_path / "ada.yaml"
    path.write_text(yaml.safe_dump(ada_config(family, **VARIANTS["layer"])))
    out = tmp_path / "merged"
    env = {k: v for k, v in os.environ.items() if k not in (faults.ENV, "RAY_ADDRESS")}
    killed = subprocess.run([sys.executable, "-m", "distmerge.cli", "adamerging", str(path), "--out", str(out),
                             "--workers", "2"], env={**env, faults.ENV: "adamerging_driver_exit_at_step=2"},
                            capture_output=True, text=True, timeout=400)
    assert killed.returncode == 3, killed.stderr[-2000:]
    assert not out.exists()
    result = run(path, out, workers=2)  # on this session's Ray: only the killed driver needs a process to die in
    assert result.resumed_from == 2
    learned = json.loads((out / "lambdas.json").read_text())["lambdas"]
    want = lambdas_by_tensor(trained["results"]["layer"])
    assert learned.keys() == want.keys()
    for tensor, per_task in want.items():
        # attention keys' bias: softmax ignores a shift shared by every key, so its gradient is rounding noise
        # (about 1e-9), and Adam's normalized step turns different noise into ~1e-4 of difference in 3 steps
        noise_only = tensor.endswith("attention.self.key.bias")
        for task, value in per_task.items():
            assert learned[tensor][task] == pytest.approx(value, abs=1e-3 if noise_only else 1e-6), (tensor, task)
    assert result.steps == 3
    np.testing.assert_allclose(result.history, trained["results"]["layer"]["history"], rtol=1e-6)


@pytest.mark.parametrize("name", ["zero", "layer", "plus"])
def test_written_merge_is_the_formula_for_lambdas_json(trained, family, name, tmp_path):
    """The engine writes theta0 + sum_t lambda_t tau_t (tau of ++ for plus) with the coefficients of
    lambdas.json, tensor by tensor; zero steps is task arithmetic at lambda_init; heads are the base's."""
    from distmerge.adamerging.driver import lambdas_by_tensor, merge_output, write_artifacts

    config, result = trained["variants"][name], trained["results"][name]
    lambdas = lambdas_by_tensor(result)
    folder = tmp_path / "run"
    folder.mkdir()
    write_artifacts(folder, config, result, lambdas)
    out = tmp_path / "merged"
    merge_output(config, result, lambdas, folder, out, workers=1, force=False)
    written = state(str(out))
    recorded = json.loads((folder / "lambdas.json").read_text())["lambdas"]
    base, names, taus = reference_task_vectors(family, plus=config.plus)
    assert sorted(recorded) == names
    if name == "zero":
        assert all(v == pytest.approx(0.3) for per_task in recorded.values() for v in per_task.values())
    for n in names:
        expected = base[n] + sum(recorded[n][task] * taus[t][n] for t, task in enumerate(TASKS))
        torch.testing.assert_close(written[n].float(), expected, atol=1e-6, rtol=0)
    for n in base:
        if n not in names:
            assert torch.equal(written[n], base[n]), n
    import pyarrow.parquet as pq

    table = pq.read_table(folder / "lambdas.parquet").to_pylist()
    assert len(table) == len(names) * len(TASKS)
    assert all(math.isclose(r["lambda"], recorded[r["tensor"]][r["task"]]) for r in table)
    assert (folder / "adamerging.png").stat().st_size > 0


def test_a_restarted_run_resumes_from_the_most_advanced_checkpoint(tmp_path):
    """What a worker of a restarted run (driver run again, or worker group restarted by Ray Train) resumes from:
    the newest complete checkpoint in the run's storage, by (variant, step), or Ray Train's own if further."""
    from safetensors.torch import save_file

    from distmerge.adamerging.train import STATE_FILE, TENSORS_FILE, latest_checkpoint, latest_state

    def checkpoint(name: str, variant: int, step: int, tensors: bytes | None = None) -> Path:
        folder = tmp_path / "ray" / "train" / name
        folder.mkdir(parents=True)
        (folder / STATE_FILE).write_text(json.dumps({"variant": variant, "step": step, "history": []}))
        save_file({"raw": torch.zeros(3)}, str(folder / TENSORS_FILE))
        if tensors is not None:
            (folder / TENSORS_FILE).write_bytes(tensors)
        return folder

    assert latest_checkpoint(tmp_path / "ray") is None
    checkpoint("checkpoint_000000", 0, 3)
    older = checkpoint("checkpoint_000001", 1, 1)
    newest = checkpoint("checkpoint_000002", 1, 2)
    whole = (newest / TENSORS_FILE).read_bytes()
    checkpoint("checkpoint_000003", 1, 3, tensors=b"")  # died before its tensors were written: not a checkpoint
    checkpoint("checkpoint_000004", 1, 4, tensors=whole[:-5])  # died while uploading them: not one either
    (tmp_path / "ray" / "train" / "checkpoint_000005").mkdir()
    (tmp_path / "ray" / "train" / "checkpoint_000005" / STATE_FILE).write_text("{not json")
    assert latest_checkpoint(tmp_path / "ray") == newest
    assert latest_state([str(older), None]) == (1, older)
    assert latest_state([str(older), str(newest)]) == (1, newest)
    assert latest_state([None, None]) is None


def test_cli_reports_a_bad_config_in_one_line(family, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from distmerge.cli import app

    path = tmp_path / "ada.yaml"
    path.write_text(yaml.safe_dump(ada_config(family, granularity="tensor")))
    result = CliRunner().invoke(app, ["adamerging", str(path), "--out", str(tmp_path / "merged")])
    assert result.exit_code == 2
    assert "granularity: 'tensor' is not one of task, layer" in result.output
    assert not (tmp_path / "merged").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_adamerging_glue_tiny_preset_runs_end_to_end(tmp_path, ray_cluster):
    """``python pipelines/adamerging_glue.py --preset tiny``: tiny RoBERTa GLUE experts, AdaMerging (layer-wise) as
    a Ray Train job beside task arithmetic and TIES, every merge scored per task (about 2-3 minutes on 2 cores)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("adamerging_glue", root / "pipelines" / "adamerging_glue.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    assert pipeline.main(["--preset", "tiny", "--out", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(results["scores"]) == {"individual", "task_arithmetic", "ties", "adamerging-layer"}
    assert all(set(scores) == set(results["tasks"]) for scores in results["scores"].values())
    for method in ("task_arithmetic", "ties", "adamerging-layer"):
        assert (tmp_path / "run" / f"merged-{method}" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "run" / "merged-adamerging-layer" / "lambdas.json").is_file()
