"""Sweeps on Ray Tune over tiny models: the same best lambda as merging and scoring each point by hand,
inputs read once per sweep, failed trials reported, interrupted sweeps resumed, bad configs refused."""

from __future__ import annotations

import json
import os
import pickle
import signal
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from ray.tune import Callback
from typer.testing import CliRunner

from conftest import merge_config
from distmerge.errors import ConfigError, OutputError

LAMBDAS = [0.0, 0.5, 1.0, 2.0]
GENERATING_LAMBDA = 1.0  # the validation texts are sampled from the task-arithmetic merge at this lambda
OVERFLOW = 1e39  # a lambda whose merge overflows float32


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A tiny Llama base, two experts, and validation texts sampled from their TA merge at lambda 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distmerge.tiny_models import build_family

    root = tmp_path_factory.mktemp("sweep_family")
    base, experts = build_family(root, "llama", experts=2, delta_scale=0.05)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    states = [AutoModelForCausalLM.from_pretrained(str(e)).state_dict() for e in experts]
    merged = {k: v + GENERATING_LAMBDA * sum(s[k] - v for s in states) for k, v in model.state_dict().items()}
    model.load_state_dict(merged)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    torch.manual_seed(0)
    with torch.no_grad():
        ids = model.generate(torch.full((64, 1), tokenizer.bos_token_id), do_sample=True, top_k=0,
                             max_new_tokens=24, pad_token_id=tokenizer.pad_token_id)
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"text": tokenizer.decode(row[1:], skip_special_tokens=True)}) + "\n"
                            for row in ids))
    return base, experts, data


def sweep_config(base, experts, data, method="task_arithmetic", parameters=None, **sweep) -> dict:
    config = merge_config(base, experts, method, **(parameters or {"lambda": {"grid": LAMBDAS}}))
    config["sweep"] = {"tasks": [{"name": "val", "type": "perplexity", "data": str(data), "batch_size": 16}],
                       "eval_chunks": 2, "max_concurrent_trials": 1, "holders": 1, "holder_cpus": 0.25, **sweep}
    return config


def score_folder(folder: Path, spec) -> float:
    """The sweep's own objective on a model loaded from disk the ordinary way."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distmerge.sweep.objectives import evaluate_in_parts

    model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    *_, last = evaluate_in_parts(lambda kind, task: model, tokenizer, spec.tasks, spec.eval_chunks)
    return last[spec.metric]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_grid_finds_the_lambda_found_by_hand_reads_inputs_once_and_reports_a_failed_trial(ray_cluster, family,
                                                                                          tmp_path):
    from distmerge import merge
    from distmerge.config import load_config
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.sweep import load_sweep, run_sweep
    from test_engine import load_folder

    base, experts, data = family
    # lambda 1e39 overflows float32: that trial's merge is refused as ``distmerge merge`` refuses it (the
    # executor's finite check), the trial fails; the others go on.
    config = sweep_config(base, experts, data, parameters={"lambda": {"grid": LAMBDAS + [OVERFLOW]}}, holders=2)
    before = set(Path(tempfile.gettempdir()).glob("distmerge-sweep-model-*"))
    result = run_sweep(config, tmp_path / "sweep", progress=False, materialize_best=True)
    spec = load_sweep(config)
    assert set(Path(tempfile.gettempdir()).glob("distmerge-sweep-model-*")) == before, "trials left temp folders"

    by_hand = {}
    for lam in LAMBDAS:
        folder = tmp_path / f"ta-{lam}"
        merge(merge_config(base, experts, "task_arithmetic", **{"lambda": lam}), folder, workers=1, progress=False)
        by_hand[lam] = score_folder(folder, spec)
    rows = {row["lambda"]: row for row in result.rows}
    assert sorted(rows) == LAMBDAS + [OVERFLOW]
    assert rows[OVERFLOW]["status"] == "failed" and "gives NaN or Inf" in rows[OVERFLOW]["error"]
    assert all(rows[lam]["status"] == "finished" for lam in LAMBDAS)
    for lam in LAMBDAS:
        assert rows[lam]["val/nll"] == pytest.approx(by_hand[lam], rel=1e-6, abs=1e-9)
    assert result.best["lambda"] == min(by_hand, key=by_hand.get) == GENERATING_LAMBDA
    assert len(set(by_hand.values())) == len(LAMBDAS)  # the objective separates the points

    # Read once per sweep: every input tensor of every model exactly once, although 5 trials merged.
    stored = len(Checkpoint(str(base), "base").tensors)
    reports = result.holder_reports
    assert sum(r["tensor_reads"] for r in reports) == 3 * stored
    assert max(r["most_reads_of_one_tensor"] for r in reports) == 1

    out = tmp_path / "sweep"
    assert load_config(out / "best.yaml").parameters["lambda"] == GENERATING_LAMBDA
    assert (out / "metric_vs_lambda.png").stat().st_size > 0
    table = (out / "results.csv").read_text()
    assert len(table.strip().splitlines()) == 1 + len(LAMBDAS) + 1
    assert "failed" in table and "gives NaN or Inf" in table
    assert list((out / "tune" / "sweep").rglob("events.out.tfevents*")), "no TensorBoard logs"
    assert json.loads((out / "summary.json").read_text())["best"]["lambda"] == GENERATING_LAMBDA

    # --materialize-best: the engine's merge of best.yaml, identical to merging that config directly.
    got, want = load_folder(result.best_model), load_folder(tmp_path / f"ta-{GENERATING_LAMBDA}")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


class _FixedSpec:
    """A sweep spec whose every trial is one config (EMR has nothing to search, so ``load_sweep`` refuses it)."""

    def __init__(self, config: dict):
        from distmerge.config import load_config

        self.config = load_config(config)

    def trial_config(self, values):
        return self.config

    def corner_values(self):
        return {}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_holders_merge_bit_identical_to_the_engine(ray_cluster, llama_family_vocab, tmp_path):
    """Every method on the same holders (reduction passes, deferred sign patches, EMR's artifacts), with a
    vocabulary to reconcile: every tensor and artifact equals what the engine writes for the same config."""
    import ray

    from distmerge import merge
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.sweep import load_sweep
    from distmerge.sweep.holders import start_holders
    from distmerge.sweep.trial import SweepContext, merged_outputs
    from distmerge.tensors import resolve_tensors
    from test_engine import load_folder

    base, experts = llama_family_vocab
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"text": "w5 w6 w7"}) + "\n" + json.dumps({"text": "w8 w9"}) + "\n")
    specs = {
        "ties": load_sweep(sweep_config(base, experts, data, "ties", {"lambda": {"grid": [0.7, 1.3]}, "density": 0.3})),
        "dare": load_sweep(sweep_config(base, experts, data, "dare", {"drop_rate": {"grid": [0.5, 0.8]}, "then": "ties",
                                                                     "density": 0.5, "seed": 3})),
    }
    fixed = {
        "weight_average": ("weight_average", {}),
        "task_arithmetic": ("task_arithmetic", {"lambda": 0.6}),
        "ties_tensor": ("ties", {"density": 0.4, "trim_scope": "tensor"}),
        "dare_l1": ("dare", {"drop_rate": 0.5, "rescale": "l1"}),
        "emr": ("emr", {}),
        "della": ("della", {"density": 0.6, "epsilon": 0.2, "seed": 1}),  # seeded drops, as DARE's
        "model_stock": ("model_stock", {}),  # whole tensors
        "tsv": ("tsv", {}),  # whole 2-D tensors through an SVD
    }
    for label, (method, params) in fixed.items():
        specs[label] = _FixedSpec(merge_config(base, experts, method, **params))
    template = specs["ties"].trial_config(specs["ties"].corner_values())
    checkpoints = (Checkpoint(str(base), "base"), [Checkpoint(m.model, m.name) for m in template.models])
    outputs, _, _ = resolve_tensors(template, *checkpoints)
    holders, names = start_holders(*checkpoints, outputs, True, template.dtype, 3, 0.25)
    got = {}
    try:
        ray.get([h.load.remote() for h in holders])
        copied = [h.copied.remote() for h in holders]
        for label, spec in specs.items():
            context = SweepContext(spec, *checkpoints, holders, names, copied, {})
            got[label] = merged_outputs(context, spec.corner_values())
        reads = ray.get([h.report.remote() for h in holders])
    finally:
        for h in holders:
            ray.kill(h)
    assert max(r["most_reads_of_one_tensor"] for r in reads) == 1
    for label, spec in specs.items():
        merge(spec.trial_config(spec.corner_values()), tmp_path / label, workers=2, progress=False)
        want = load_folder(tmp_path / label)
        weights, artifacts, state = got[label]
        assert set(weights) == set(want)
        for name in want:
            assert weights[name].dtype == want[name].dtype and torch.equal(weights[name], want[name]), (label, name)
        want_artifacts = load_folder(tmp_path / label / "emr") if label == "emr" else {}
        assert set(artifacts) == set(want_artifacts), label
        for key in want_artifacts:
            assert torch.equal(artifacts[key], want_artifacts[key]), (label, key)
    assert len(got["emr"][1]) > 10
    emr_index = json.loads((tmp_path / "emr" / "emr" / "index.json").read_text())
    assert got["emr"][2]["rescalers"] == pytest.approx(emr_index["metadata"]["rescalers"], rel=1e-12)
    # A trial scores each EMR task on that task's weights: exactly what `distmerge emr-task` materializes.
    from distmerge.emr_task import materialize_task
    from distmerge.methods.emr import Emr

    weights, artifacts, state = got["emr"]
    for t, name in enumerate(["e0", "e1"]):
        want = load_folder(materialize_task(tmp_path / "emr", name, tmp_path / f"emr-{name}"))
        task_weights = Emr(None).task_weights(weights, artifacts, state, t)
        assert set(task_weights) == set(want) and all(torch.equal(task_weights[k], want[k]) for k in want), name


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_evaluator_tasks_score_the_merged_tensors(ray_cluster, family, tmp_path):
    """type: eval hands the in-memory merge to distmerge.evaluate; the built-in perplexity is the same scorer, so
    both give the same number, long texts included."""
    import math

    from distmerge.sweep import run_sweep

    base, experts, family_data = family
    # A text longer than any window: both scorers must split it the same way, not truncate it.
    data = tmp_path / "with_long_text.jsonl"
    long_text = " ".join(json.loads(line)["text"] for line in family_data.read_text().splitlines()[:40])
    data.write_text(family_data.read_text() + json.dumps({"text": long_text}) + "\n")
    # One trial, one part: each part is one evaluator run (a Ray Data pipeline with its own model actor).
    config = sweep_config(base, experts, data, parameters={"lambda": {"grid": [GENERATING_LAMBDA]}},
                          metric="ev/perplexity", eval_chunks=1)
    config["sweep"]["tasks"].append({"name": "ev", "type": "eval", "task": "perplexity", "data": str(data),
                                     "batch_size": 32, "cpus_per_worker": 0.5})
    result = run_sweep(config, tmp_path / "sweep", progress=False)
    [row] = result.rows
    assert row["status"] == "finished" and row["eval_parts"] == 1
    assert row["ev/tokens"] == row["val/tokens"]
    assert row["ev/perplexity"] == pytest.approx(math.exp(row["val/nll"]), rel=1e-6)


def test_models_built_from_state_dicts_score_like_loaded_ones(tmp_path):
    """The in-memory model (meta init + assigned tensors) of a tied Llama and of a RoBERTa classifier gives the
    outputs of the same checkpoint loaded with from_pretrained; accuracy counts string and integer labels."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from distmerge.sweep.objectives import build_model, evaluate_in_parts
    from distmerge.sweep.tasks import TaskSpec
    from distmerge.tiny_models import build_family

    tied, _ = build_family(tmp_path / "tied", "llama", experts=1, tie=True)
    state = {k: v for f in sorted(tied.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    assert "lm_head.weight" not in state
    built = build_model(tied, state, "causal_lm")
    loaded = AutoModelForCausalLM.from_pretrained(str(tied)).eval()
    ids = torch.tensor([[1, 5, 9, 33, 7]])
    with torch.no_grad():
        assert torch.allclose(built(ids).logits, loaded(ids).logits, atol=1e-6)

    roberta, _ = build_family(tmp_path / "roberta", "roberta", experts=1)
    state = {k: v for f in sorted(roberta.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    model = build_model(roberta, state, "sequence_classification")
    tokenizer = AutoTokenizer.from_pretrained(str(roberta))
    texts = [f"w{i} w{i + 3} w{2 * i + 5}" for i in range(4, 16)]
    reference = AutoModelForSequenceClassification.from_pretrained(str(roberta)).eval()
    with torch.no_grad():
        predicted = reference(**tokenizer(texts, return_tensors="pt", padding=True)).logits.argmax(-1).tolist()
    id2label = reference.config.id2label
    labels = [id2label[p] if i % 2 else p for i, p in enumerate(predicted)]  # every prediction right
    labels[0] = (predicted[0] + 1) % 3  # one wrong
    task = TaskSpec("cls", "classification", "x", tuple(zip(texts, labels)), 64, 5)
    *_, last = evaluate_in_parts(lambda kind, task: model, tokenizer, (task,), 3)
    assert last["cls/accuracy"] == pytest.approx(11 / 12) and last["cls/examples"] == 12


def test_concurrency_leaves_room_for_the_evaluator(family):
    from distmerge.sweep import load_sweep
    from distmerge.sweep.driver import concurrency

    base, experts, data = family
    plain = load_sweep(sweep_config(base, experts, data, max_concurrent_trials=3))
    assert concurrency(plain, 1.5) == 3  # built-in tasks: Tune packs trials by their own resources
    config = sweep_config(base, experts, data, max_concurrent_trials=None)
    del config["sweep"]["max_concurrent_trials"]
    config["sweep"]["tasks"] = [{"name": "ev", "type": "eval", "task": "perplexity", "data": str(data),
                                 "cpus_per_worker": 0.5}]
    spec = load_sweep(config)  # a trial: 1 CPU + 0.5 for the evaluator's model actor + 0.5 for its light tasks
    assert concurrency(spec, 3.75) == 1 and concurrency(spec, 4.0) == 2
    with pytest.raises(ConfigError, match="a trial needs 1 CPU"):
        concurrency(spec, 1.75)


class InterruptOnce(Callback):
    """Ctrl+C (SIGINT to this process) once ``after`` trials have completed, in the first run only (Tune saves
    callbacks with the experiment and gives them back to the resumed run)."""

    def __init__(self, after: int, flag: Path):
        self.after, self.flag, self.completed = after, flag, 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.completed += 1
        if self.completed >= self.after and not self.flag.exists():
            self.flag.touch()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_resume_runs_only_the_remaining_trials(ray_cluster, family, tmp_path):
    from distmerge.sweep import run_sweep

    base, experts, data = family
    grid = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0]
    config = sweep_config(base, experts, data, parameters={"lambda": {"grid": grid}}, eval_chunks=1,
                          max_concurrent_trials=1)
    out = tmp_path / "sweep"
    first = run_sweep(config, out, progress=False, callbacks=[InterruptOnce(2, tmp_path / "interrupted")])
    assert first.interrupted
    assert (out / "tune").stat().st_mode & 0o777 == 0o700  # Tune's pickles: in a folder only this user writes
    done_first = {r["trial"]: r for r in first.rows if r["status"] == "finished"}
    assert len(done_first) >= 2 and first.remaining == len(grid) - len(done_first) > 0

    with pytest.raises(OutputError, match="--resume"):
        run_sweep(config, out, progress=False)
    changed = sweep_config(base, experts, data, parameters={"lambda": {"grid": grid + [3.0]}}, eval_chunks=1)
    with pytest.raises(ConfigError, match="differs from the one that started"):
        run_sweep(changed, out, progress=False, resume=True)
    second = run_sweep(config, out, progress=False, resume=True)
    assert not second.interrupted
    assert sorted(r["lambda"] for r in second.rows) == grid
    assert all(r["status"] == "finished" for r in second.rows)
    # Only the remaining trials ran: this run's holders merged exactly that many, read their inputs once.
    assert second.trials_merged_here == first.remaining
    assert max(r["most_reads_of_one_tensor"] for r in second.holder_reports) == 1
    for trial, row in done_first.items():
        again = next(r for r in second.rows if r["trial"] == trial)
        assert again["val/nll"] == row["val/nll"] and again["time_total_s"] == row["time_total_s"]


def _emr_sweep(base, experts, data) -> dict:
    """EMR has nothing to search: one trial, each task scored on its expert's EMR model."""
    config = merge_config(base, experts, "emr")
    config["sweep"] = {"tasks": [{"name": f"val_e{i}", "type": "perplexity", "data": str(data), "batch_size": 16,
                                  "expert": f"e{i}"} for i in range(len(experts))],
                       "eval_chunks": 2, "max_concurrent_trials": 1, "holders": 1, "holder_cpus": 0.25}
    return config


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_emr_sweep_scores_each_task_on_its_experts_model(ray_cluster, family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distmerge.emr_task import materialize_task
    from distmerge.sweep import load_sweep, run_sweep
    from distmerge.sweep.objectives import evaluate_in_parts

    base, experts, data = family
    config = _emr_sweep(base, experts, data)
    result = run_sweep(config, tmp_path / "sweep", progress=False, materialize_best=True)
    [row] = result.rows
    assert row["status"] == "finished" and result.params == ()
    spec = load_sweep(config)
    for t, task in enumerate(spec.tasks):
        folder = materialize_task(result.best_model, task.expert, tmp_path / f"task-{task.expert}")
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
        *_, last = evaluate_in_parts(lambda kind, task: model, tokenizer, (task,), spec.eval_chunks)
        assert row[f"{task.name}/nll"] == pytest.approx(last[f"{task.name}/nll"], rel=1e-6, abs=1e-9)
    assert row["val_e0/nll"] != row["val_e1/nll"]  # two models, not one


@pytest.mark.parametrize("change, message", [
    (lambda c: c["parameters"].update({"density": {"uniform": [0.1, 0.9]}}), "use search: random or optuna"),
    (lambda c: c["parameters"].update({"lambda": {"grd": [1, 2]}}), "parameters.lambda: a search space is one of"),
    (lambda c: c["parameters"].update({"density": {"grid": [0.5, 1.5]}}),
     "parameters.density: the search space allows 1.5, which the merge rejects"),
    (lambda c: c.update(method={"grid": ["ties", "dare"]}), "method: only parameters and models"),
    (lambda c: c["sweep"].update(search="optuna", eval_chunks=1) or c["parameters"].update(
        {"lambda": {"uniform": [0.1, 1]}}), "optuna"),
    (lambda c: c["sweep"].update(scheduler="asha", eval_chunks=1), "set sweep.eval_chunks to 2 or more"),
    (lambda c: c["sweep"].update(metric="val/accuracy"), "sweep.metric: 'val/accuracy' is not reported"),
    (lambda c: c["sweep"]["tasks"][0].update(data="/nonexistent/val.jsonl"), "sweep.tasks[0].data: cannot read"),
    (lambda c: c["sweep"].update(holders=0), "sweep.holders: expected an integer >= 1"),
    (lambda c: c["sweep"]["tasks"].append({"type": "eval", "task": "nosuch", "data": c["sweep"]["tasks"][0]["data"]}),
     "sweep.tasks[1].task: unknown task 'nosuch'"),
    (lambda c: c["sweep"]["tasks"].append({"type": "eval", "task": "gsm8k", "data": c["sweep"]["tasks"][0]["data"]}),
     "sweep.tasks[1].data: task 'gsm8k'"),
    (lambda c: c["parameters"].update({"lambda": 1.0}), "nothing to search"),
    (lambda c: c["models"][0].update(parameters={"weight": {"loguniform": [0, 1]}}),
     "models[0].parameters.weight.loguniform: low must be > 0"),
    (lambda c: c["sweep"]["tasks"][0].update(expert="e0"), "sweep.tasks[0].expert: method 'ties' builds one model"),
    (lambda c: c.update(method="emr", parameters={}), "sweep.tasks[0].expert: missing; method 'emr' builds one"),
    (lambda c: c.update(method="emr", parameters={}) or c["sweep"]["tasks"][0].update(expert="e7"),
     "sweep.tasks[0].expert: 'e7' is not a model of the merge (one of e0, e1)"),
])
def test_bad_sweep_config_is_a_clear_error(family, tmp_path, change, message):
    from distmerge.sweep import run_sweep

    base, experts, data = family
    config = sweep_config(base, experts, data, "ties", {"lambda": {"grid": [0.5, 1.0]}, "density": 0.5})
    change(config)
    with pytest.raises(ConfigError) as info:
        run_sweep(config, tmp_path / "out", progress=False)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_resume_needs_a_sweep_to_resume(family, tmp_path):
    from distmerge.sweep import run_sweep
    from distmerge.sweep.driver import STATE_FILE
    from distmerge.sweep.spec import load_sweep

    base, experts, data = family
    config = sweep_config(base, experts, data)
    out = tmp_path / "sweep"
    (out / "tune" / "sweep").mkdir(parents=True)
    (out / STATE_FILE).write_text(json.dumps(load_sweep(config).fingerprint()))
    with pytest.raises(OutputError, match="no sweep to resume"):
        run_sweep(config, out, resume=True, progress=False)


class PlantsMarker:
    """Unpickling this creates the marker folder: proof that a file was run as code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.skipif(os.getuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("spoil", ["tune_world_writable", "tune_other_owner", "out_group_writable"])
def test_resume_never_unpickles_from_a_folder_others_could_write(ray_cluster, family, tmp_path, spoil):
    from distmerge.sweep import run_sweep
    from distmerge.sweep.driver import STATE_FILE
    from distmerge.sweep.spec import load_sweep

    base, experts, data = family
    config = sweep_config(base, experts, data)
    out = tmp_path / "sweep"
    (out / "tune" / "sweep").mkdir(parents=True)
    (out / "tune").chmod(0o700)
    (out / STATE_FILE).write_text(json.dumps(load_sweep(config).fingerprint()))
    marker = tmp_path / "unpickled"
    # Tune restores an experiment by unpickling tuner.pkl (and trial states): what someone else could plant.
    (out / "tune" / "sweep" / "tuner.pkl").write_bytes(pickle.dumps(PlantsMarker(marker)))
    if spoil == "tune_world_writable":
        (out / "tune").chmod(0o777)
    elif spoil == "tune_other_owner":
        os.chown(out / "tune", 12345, 12345)
    else:
        out.chmod(0o775)
    with pytest.raises(OutputError, match="cannot be trusted") as info:
        run_sweep(config, out, resume=True, progress=False)
    assert str(out) in str(info.value)
    assert not marker.exists()


def test_cli_reports_a_bad_sweep_in_one_line(family, tmp_path):
    from distmerge.cli import app

    base, experts, data = family
    config = sweep_config(base, experts, data, parameters={"lambda": {"uniform": [0.0, 2.0]}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    result = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "error: sweep.search: 'grid' tries listed values only" in result.output
    assert "Traceback" not in result.output
