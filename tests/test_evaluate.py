"""Evaluation end to end through Ray Data on tiny models built here, against plain single-process loops."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from distmerge.evaluate import answers, runner
from distmerge.evaluate.models import ModelSource
from distmerge.evaluate.sandbox import SandboxLimits
from distmerge.evaluate.tasks import get_task
from distmerge.tiny_models import build_family, build_tokenizer, save_model

pytestmark = [pytest.mark.ray, pytest.mark.usefixtures("ray_cluster")]

# Words the chain model knows besides w4..w63; each chain below is what it generates after the chain's first token.
CHAIN_WORDS = ("The", "answer", "is:", "3", "7", "Response:", "def", "f(x):", "return", "x")
CHAINS = (("<unk>", "The", "answer", "is:"), ("3", "</s>"), ("7", "</s>"),
          ("Response:", "def", "f(x):", "return", "x", "</s>"))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(4, 64)}" for _ in range(rng.randrange(2, 9))) for _ in range(n)]


def build_chain_llama(path: Path, calibration_prompts: list[str], hidden: int = 32) -> Path:
    """A tiny Llama whose greedy output is fixed by construction: WizardMath prompts end in unknown words (<unk>),
    after which it writes "The answer is:" and then 3 or 7, decided by attention over the whole prompt (so padding
    mistakes change answers); after the Alpaca code prompt's "Response:" it writes "def f(x): return x".

    Decoder layers add only attention (MLPs zeroed); the head maps each chain word's embedding to its successor.
    "3" and "7" get the same pull from "is:" plus opposite pulls along a direction orthogonal to it, shifted so
    that half of ``calibration_prompts`` (with "The answer is:" appended) come out 3.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(64, CHAIN_WORDS)
    ids = tokenizer.convert_tokens_to_ids
    vocab = len(tokenizer)
    generator = torch.Generator().manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        embedding = torch.randn(vocab, hidden, generator=generator)
        unit = embedding / embedding.norm(dim=1, keepdim=True)
        for layer in model.model.layers:
            attention = layer.self_attn
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
                proj.weight.copy_(torch.randn(proj.weight.shape, generator=generator) / hidden**0.5)
            attention.o_proj.weight.copy_(torch.randn(attention.o_proj.weight.shape, generator=generator) * 0.3
                                          / hidden**0.5)
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(embedding)
        model.model.norm.weight.fill_(1.0)
        head = torch.zeros(vocab, hidden)
        for chain in CHAINS:
            for a, b in zip(chain, chain[1:]):
                head[ids(b)] += 20 * unit[ids(a)]
        u = unit[ids("is:")]
        direction = torch.randn(hidden, generator=generator)
        direction -= (direction @ u) * u
        direction /= direction.norm()
        head[ids("3")] += 20 * u + 20 * direction
        head[ids("7")] += 20 * u - 20 * direction
        model.lm_head.weight.copy_(head)
        # Centre the 3-vs-7 decision between the two middle calibration prompts: adding -s/2*u to "3" and s/2*u
        # to "7" moves prompt i's margin by -s * (u . h_i), h_i its final normed hidden state.
        ratios = []
        for prompt in calibration_prompts:
            out = model(**tokenizer(prompt + " The answer is:", return_tensors="pt"), output_hidden_states=True)
            margin = float(out.logits[0, -1, ids("3")] - out.logits[0, -1, ids("7")])
            ratios.append(margin / float(out.hidden_states[-1][0, -1] @ u))
        ratios.sort()
        s = (ratios[len(ratios) // 2 - 1] + ratios[len(ratios) // 2]) / 2
        head[ids("3")] -= s / 2 * u
        head[ids("7")] += s / 2 * u
        model.lm_head.weight.copy_(head)
    return save_model(model, tokenizer, path)


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    questions = _questions(12)
    return [{"question": q, "answer": f"reasoning\n#### {7 if i % 2 else 3}"} for i, q in enumerate(questions)]


@pytest.fixture(scope="module")
def chain_llama(tmp_path_factory, gsm8k_rows) -> Path:
    prompts = [get_task("gsm8k").prepare(r)["prompt"] for r in gsm8k_rows]
    return build_chain_llama(tmp_path_factory.mktemp("chain") / "llama", prompts)


@pytest.fixture(scope="module")
def roberta_family(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_family(tmp_path_factory.mktemp("roberta"), "roberta", experts=1)


def _load_causal(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(str(path))


def loop_generate(path: Path, task_name: str, rows: list[dict], max_new_tokens: int) -> tuple[list[str], list[float]]:
    """The plain way: one prompt at a time, no padding, no Ray."""
    task = get_task(task_name)
    model, tokenizer = _load_causal(path)
    outputs, scores = [], []
    for row in rows:
        prepared = task.prepare(row)
        encoded = tokenizer(prepared["prompt"], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
        text = tokenizer.decode(generated[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        text = answers.truncate_at_stop(text, task.stop)
        outputs.append(text)
        scores.append(task.score(text, math.nan, prepared, sandbox=SandboxLimits(timeout=5.0))[0])
    return outputs, scores


# --- generation ------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_gsm8k_through_ray_equals_a_plain_loop(chain_llama, gsm8k_rows, tmp_path):
    data = _write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows)
    result = runner.evaluate(chain_llama, "gsm8k", data, batch_size=5, workers=2, max_new_tokens=8,
                             out=tmp_path / "results")
    rows = __import__("pandas").read_parquet(result.rows_path)
    outputs, scores = loop_generate(chain_llama, "gsm8k", gsm8k_rows, max_new_tokens=8)

    assert rows["index"].tolist() == list(range(len(gsm8k_rows)))  # file order, through two actors
    assert rows["output"].tolist() == outputs  # left-padded batches decode exactly as one prompt at a time
    assert set(outputs) == {"The answer is: 3", "The answer is: 7"}  # the answer depends on the prompt
    assert rows["score"].tolist() == scores
    assert result.metrics == {"accuracy": sum(scores) / len(scores)}
    assert 0 < result.score < 1
    assert rows["extracted"].tolist() == [o.rsplit(" ", 1)[1] for o in outputs]
    assert rows["reference"].tolist() == [r["answer"].rsplit(" ", 1)[1] for r in gsm8k_rows]
    assert rows["prompt"][0].endswith("### Response: Let's think step by step.")


@pytest.mark.timeout(300)
def test_humaneval_runs_generated_code_in_the_sandbox(chain_llama, tmp_path):
    from distmerge.evaluate.sandbox import namespaces_refused

    if namespaces_refused():
        pytest.skip(f"the kernel refuses the sandbox's namespaces here: {namespaces_refused()}")
    # The model always writes "def f(x): return x"; the tests decide: pass, fail, hang, crash.
    def problem(i, check_body):
        return {"task_id": f"HumanEval/{i}", "prompt": "def f(x):\n    \"\"\"Return x.\"\"\"\n", "entry_point": "f",
                "canonical_solution": "    return x\n", "test": f"def check(candidate):\n{check_body}\n"}

    rows = [problem(0, "    assert candidate(2) == 2"), problem(1, "    assert candidate(2) == 4"),
            problem(2, "    while True:\n        pass"), problem(3, "    import os\n    os.abort()"),
            problem(4, "    open('/tmp/distmerge-humaneval-escape', 'w').write('x')")]
    data = _write_jsonl(tmp_path / "he.jsonl", rows)
    result = runner.evaluate(chain_llama, "humaneval", data, batch_size=3, workers=1, max_new_tokens=8,
                             keep_rows=True, sandbox=SandboxLimits(timeout=2.0))
    assert result.rows["output"].tolist() == ["def f(x): return x"] * 5
    assert result.rows["score"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    verdicts = result.rows["extracted"].tolist()
    assert verdicts[0] == "passed" and verdicts[1].startswith("failed: AssertionError")
    assert verdicts[2] == "timeout" and verdicts[3] == "killed" and verdicts[4].startswith("failed")
    assert result.metrics == {"pass@1": 0.2} and result.isolation == "namespaces"
    assert not Path("/tmp/distmerge-humaneval-escape").exists()


# --- classification --------------------------------------------------------------------------------

def _glue_rows(task: str, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    first, second = {"mnli": ("premise", "hypothesis"), "stsb": ("sentence1", "sentence2")}[task]
    rows = []
    for q1, q2 in zip(_questions(n, seed), _questions(n, seed + 1)):
        label = rng.randrange(3) if task == "mnli" else round(rng.uniform(0, 5), 2)
        rows.append({first: q1, second: q2, "label": label, "idx": len(rows)})
    return rows


def loop_classify(model, tokenizer, task_name: str, rows: list[dict]) -> list[float]:
    task = get_task(task_name)
    predictions = []
    for row in rows:
        prepared = task.prepare(row)
        encoded = tokenizer(prepared["prompt"], prepared["pair"], truncation=True, max_length=64, return_tensors="pt")
        encoded.pop("token_type_ids", None)
        with torch.no_grad():
            logits = model(**encoded).logits[0]
        predictions.append(float(logits[0]) if logits.shape[0] == 1 else float(logits.argmax()))
    return predictions


@pytest.mark.timeout(300)
def test_glue_head_from_an_expert_equals_a_plain_loop(roberta_family, tmp_path):
    """The merged backbone (here: the base) with the expert's own classifier head, as the GLUE papers evaluate."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distmerge.evaluate import metrics

    base, (expert,) = roberta_family
    rows = _glue_rows("mnli", 20, seed=3)
    data = _write_jsonl(tmp_path / "mnli.jsonl", rows)
    result = runner.evaluate(base, "mnli", data, head_from=str(expert), batch_size=6, keep_rows=True)

    model = AutoModelForSequenceClassification.from_pretrained(str(base)).eval()
    head = {k: v for k, v in AutoModelForSequenceClassification.from_pretrained(str(expert)).state_dict().items()
            if "classifier" in k}
    model.load_state_dict(head, strict=False)
    predictions = loop_classify(model, AutoTokenizer.from_pretrained(str(base)), "mnli", rows)
    labels = [r["label"] for r in rows]

    assert result.rows["prediction"].tolist() == predictions
    assert result.metrics == {"accuracy": metrics.accuracy(predictions, labels)}
    plain_base = loop_classify(AutoModelForSequenceClassification.from_pretrained(str(base)).eval(),
                               AutoTokenizer.from_pretrained(str(base)), "mnli", rows)
    assert plain_base != predictions  # the expert's head was really used


@pytest.mark.timeout(300)
def test_stsb_from_tensors_in_memory_equals_a_plain_loop(roberta_family, tmp_path):
    """A regression head scored from a state dict in the object store, with no checkpoint on disk (the sweep's
    case): Pearson/Spearman equal the loop's."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from distmerge.evaluate import metrics

    base, _ = roberta_family
    config = AutoConfig.from_pretrained(str(base), num_labels=1)
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    rows = _glue_rows("stsb", 16, seed=5)
    source = ModelSource.from_state_dict(config.to_dict(), model.state_dict(), tokenizer=str(base))
    result = runner.evaluate(source, "stsb", rows, batch_size=5, keep_rows=True)

    predictions = loop_classify(model, AutoTokenizer.from_pretrained(str(base)), "stsb", rows)
    labels = [r["label"] for r in rows]
    assert result.rows["prediction"].tolist() == pytest.approx(predictions, abs=1e-5)
    expected = metrics.glue_metrics("stsb", predictions, labels)
    assert result.metrics == pytest.approx(expected, abs=1e-5)
    assert result.primary == "pearson" and result.score == pytest.approx(expected["pearson"], abs=1e-5)


# --- streaming -------------------------------------------------------------------------------------

@pytest.mark.timeout(300)
def test_streaming_keeps_a_bounded_window_of_rows(roberta_family):
    """600 rows of 16 KB (about 10 MB) through a 1 MB object-store budget: results arrive while most rows have
    not been produced yet, and the rows in flight stay a small window, so memory does not grow with the data."""
    import ray
    from ray.data import ExecutionResources

    base, (expert,) = roberta_family

    @ray.remote(num_cpus=0)
    class Produced:
        def __init__(self):
            self.count = 0

        def add(self, n):
            self.count += n

        def get(self):
            return self.count

    produced = Produced.remote()
    total, filler = 600, " ".join(["w9"] * 5400)  # about 16 KB per row

    def make_rows(batch):
        ids = batch["id"].tolist()
        ray.get(produced.add.remote(len(ids)))
        return {"premise": [f"w{4 + i % 50} {filler}" for i in ids], "hypothesis": ["w5 w6"] * len(ids),
                "label": [i % 3 for i in ids]}

    dataset = ray.data.range(total, override_num_blocks=60).map_batches(make_rows, batch_size=10, num_cpus=0.25)
    dataset.context.execution_options.resource_limits = ExecutionResources(object_store_memory=1 << 20)
    in_flight = []

    def on_batch(done):
        in_flight.append(ray.get(produced.get.remote()) - done)

    result = runner.evaluate(base, "mnli", dataset, head_from=str(expert), batch_size=16, workers=1,
                             on_batch=on_batch)
    assert result.examples == total
    assert len(in_flight) > 5  # results streamed back in many pieces
    assert in_flight[0] < total / 2  # the first results came before most rows existed
    assert max(in_flight) < total / 2  # never more than a window of rows between production and scoring


# --- CLI: a suite with MBPP and perplexity ---------------------------------------------------------

def loop_perplexity(path: Path, lines: list[str]) -> float:
    model, tokenizer = _load_causal(path)
    nll, count = 0.0, 0
    for line in lines:
        ids = torch.tensor([tokenizer(line)["input_ids"]])
        if ids.shape[1] < 2:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=ids).loss  # mean over the line's predicted tokens
        nll += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(nll / count)


@pytest.mark.timeout(300)
def test_eval_command_runs_a_suite(chain_llama, tmp_path):
    import pandas as pd
    import yaml
    from typer.testing import CliRunner

    from distmerge.cli import app

    mbpp = _write_jsonl(tmp_path / "mbpp.jsonl", [
        {"task_id": 11, "text": "Return x.", "test_list": ["assert f(3) == 3"], "code": "def f(x): return x"},
        {"task_id": 12, "text": "Double x.", "test_list": ["assert f(3) == 6"], "code": "def f(x): return 2 * x"},
        {"task_id": 13, "text": "Return x.", "test_list": ["assert f(0) == 0", "assert f(-1) == -1"], "code": ""},
    ])
    lines = [" ".join(f"w{(7 * i + j) % 60 + 4}" for j in range(5 + i)) for i in range(8)]
    text = tmp_path / "text.txt"
    text.write_text("\n".join(lines) + "\n")
    experts = tmp_path / "experts.json"
    experts.write_text(json.dumps({"mbpp": 0.8}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "model": str(chain_llama), "batch_size": 2, "expert_results": "experts.json",
        "tasks": [{"task": "mbpp", "data": "mbpp.jsonl", "max_new_tokens": 8},
                  {"task": "perplexity", "data": "text.txt", "batch_size": 3}]}))
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["eval", "--suite", str(suite), "--out", str(out), "--workers", "1"])
    assert result.exit_code == 0, result.output

    summary = json.loads((out / "summary.json").read_text())["tasks"]
    assert summary["mbpp"]["score"] == pytest.approx(2 / 3) and summary["mbpp"]["examples"] == 3
    assert summary["mbpp"]["normalized"] == pytest.approx(100 * (2 / 3) / 0.8)
    assert summary["perplexity"]["score"] == pytest.approx(loop_perplexity(chain_llama, lines), rel=1e-5)
    assert "normalized" not in summary["perplexity"]
    mbpp_rows = pd.read_parquet(out / "mbpp.parquet")
    assert mbpp_rows["score"].tolist() == [1.0, 0.0, 1.0]
    assert list(mbpp_rows.columns) == ["index", "prompt", "output", "reference", "extracted", "score"]
    ppl_rows = pd.read_parquet(out / "perplexity.parquet")
    assert ppl_rows["prompt"].tolist() == lines and (ppl_rows["tokens"] == [len(l.split()) - 1 for l in lines]).all()
    assert "mbpp" in result.output and "perplexity" in result.output and "mean normalized score" in result.output


def test_eval_command_user_errors_are_one_line(tmp_path, chain_llama):
    from typer.testing import CliRunner

    from distmerge.cli import app

    cli = CliRunner()
    cases = [
        (["eval", str(chain_llama), "--task", "squad", "--data", "x.jsonl"], "unknown task 'squad'"),
        (["eval", str(chain_llama), "--task", "gsm8k", "--data", str(tmp_path / "missing.jsonl")], "does not exist"),
        (["eval", str(chain_llama), "--task", "gsm8k"], "pass --data"),  # no `datasets` here, or offline
        (["eval", str(chain_llama)], "give either --task (with --data) or --suite"),
        (["eval", str(tmp_path / "nope"), "--task", "gsm8k", "--data", "x.jsonl"], "does not exist"),
    ]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "no question here"}])
    cases.append((["eval", str(chain_llama), "--task", "gsm8k", "--data", str(bad)],
                  "has no field 'question' or 'query'"))
    suite = tmp_path / "suite.yaml"
    suite.write_text("tasks:\n  - task: gsm8k\n    limit: 0\n")
    cases.append((["eval", str(chain_llama), "--suite", str(suite)], "tasks[0].limit: expected an integer >= 1"))
    for args, message in cases:
        result = cli.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, result.output)


def test_task_model_materializes_the_emr_task_and_cleans_up(llama_family, tmp_path):
    """--task-model: the actors load the EMR task model that distmerge.emr_task materializes in a scratch folder,
    which is removed afterwards."""
    from safetensors.torch import load_file

    from conftest import merge_config
    from distmerge.emr_task import materialize_task
    from distmerge.engine.driver import merge
    from distmerge.errors import InputError

    base, experts = llama_family
    merged = tmp_path / "emr"
    merge(merge_config(base, experts, "emr"), merged, workers=1, progress=False)
    reference = materialize_task(merged, "e1", tmp_path / "e1")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    with runner.task_model_source(ModelSource.of(merged, task_model="e1"), scratch) as source:
        assert source.task_model is None and Path(source.path).is_dir()
        for shard in sorted(reference.glob("*.safetensors")):
            ours, theirs = load_file(Path(source.path) / shard.name), load_file(shard)
            assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert list(scratch.iterdir()) == []
    with pytest.raises(InputError, match="task 'nope' is not in this EMR merge"):
        with runner.task_model_source(ModelSource.of(merged, task_model="nope"), scratch):
            pass
