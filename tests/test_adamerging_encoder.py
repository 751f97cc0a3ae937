"""AdaMerging ``kind: encoder``: bare encoders merged, each task's Linear head kept apart in its own file
(sentence encoders; the paper's CLIP/ViT setting). Ray-free: the config's checks, the objective against a hand
computation, and the coefficient gradients of ``build_setup`` + ``step_objective`` against plain autograd."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distmerge.errors import ConfigError

TASKS = ("alpha", "beta")
LABELS = {"alpha": 3, "beta": 2}
ROWS = 8
HIDDEN = 32


def bert_config():
    from transformers import BertConfig

    return BertConfig(vocab_size=128, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=40, pad_token_id=3)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A bare tiny BERT (no pooler) as base, two experts = base + seeded deltas, and a confident head per task."""
    from transformers import BertModel

    from distmerge.tiny_models import build_tokenizer

    root = tmp_path_factory.mktemp("ada_encoder")
    torch.manual_seed(0)
    tokenizer = build_tokenizer(128)
    base = BertModel(bert_config(), add_pooling_layer=False)
    base.save_pretrained(str(root / "base"))
    tokenizer.save_pretrained(str(root / "base"))
    experts, heads = {}, {}
    for i, task in enumerate(TASKS):
        generator = torch.Generator().manual_seed(10 + i)
        expert = BertModel(bert_config(), add_pooling_layer=False)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for param in expert.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        expert.save_pretrained(str(root / task))
        tokenizer.save_pretrained(str(root / task))
        experts[task] = str(root / task)
        head = {"weight": torch.randn(LABELS[task], HIDDEN, generator=generator) * 3.0,
                "bias": torch.randn(LABELS[task], generator=generator)}
        save_file(head, str(root / f"{task}-head.safetensors"))
        heads[task] = str(root / f"{task}-head.safetensors")
    rng = np.random.default_rng(0)
    data = {}
    for task in TASKS:  # texts of different lengths, so the mean pooling's mask matters
        data[task] = [" ".join(f"w{w}" for w in rng.integers(4, 128, size=int(rng.integers(2, 9))))
                      for _ in range(ROWS)]
        (root / f"{task}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in data[task]))
    save_file({"weight": torch.zeros(2, HIDDEN + 1), "bias": torch.zeros(2)}, str(root / "wide.safetensors"))
    save_file({"weight": torch.zeros(2, HIDDEN)}, str(root / "nobias.safetensors"))
    return {"root": root, "base": str(root / "base"), "experts": experts, "heads": heads, "data": data}


def ada_config(family, **overrides) -> dict:
    config = {"base": family["base"], "experts": family["experts"], "kind": "encoder", "heads": family["heads"],
              "data": {t: {"path": str(family["root"] / f"{t}.jsonl"), "fields": ["text"]} for t in TASKS},
              "batches": 2, "batch_size": 4, "steps": 1, "max_length": 16, "granularity": "layer"}
    config.update(overrides)
    return {k: v for k, v in config.items() if v is not None}


def prepared(family, **overrides):
    from distmerge.adamerging.driver import prepare

    return prepare(ada_config(family, **overrides))


def state(folder: str) -> dict[str, torch.Tensor]:
    from distmerge.io.checkpoint import Checkpoint

    checkpoint = Checkpoint(folder, folder)
    try:
        return {name: checkpoint.read(name) for name in checkpoint.tensors}
    finally:
        checkpoint.close()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    p = logits.softmax(-1)
    return -(p * logits.log_softmax(-1)).sum(-1)


# --- config -----------------------------------------------------------------------------------------------


def test_config_errors_name_the_key(family):
    root = family["root"]
    alpha = family["heads"]["alpha"]
    cases = (
        ({"heads": None}, "heads: kind 'encoder' needs"),
        ({"kind": "classify"}, "heads: only for kind 'encoder'"),
        ({"heads": None, "kind": "causal", "pooling": "cls"}, "pooling: only for kind 'encoder'"),
        ({"pooling": "max"}, "pooling: 'max' is not one of mean, cls"),
        ({"heads": {"alpha": alpha}}, "heads.beta: missing"),
        ({"heads": {**family["heads"], "gamma": alpha}}, "heads.gamma: no expert"),
        ({"heads": {"alpha": alpha, "beta": str(root / "beta.pt")}}, "heads.beta: expected the path of a .safetensors"),
        ({"heads": "x.safetensors"}, "heads: expected a mapping"),
        ({"objective": "sft", "data": {t: {"path": str(root / f"{t}.jsonl"), "target": "text"} for t in TASKS}},
         "objective: 'sft' trains on target text"),
        ({"heads": {"alpha": alpha, "beta": str(root / "gone.safetensors")}}, "heads.beta: '.*gone.safetensors' does not exist"),
        ({"heads": {"alpha": alpha, "beta": str(root / "wide.safetensors")}}, "heads.beta: .* width 33; the base's hidden size is 32"),
        ({"heads": {"alpha": alpha, "beta": str(root / "nobias.safetensors")}}, "heads.beta: .* holds weight; a head is"),
        ({"heads": {"alpha": alpha, "beta": str(root / "base" / "model.safetensors")}}, "heads.beta: .* holds embeddings"),
    )
    for change, message in cases:
        with pytest.raises(ConfigError, match=rf"^{message}"):
            prepared(family, **change)


def test_heads_make_auto_an_encoder_and_enter_the_run_key(family):
    from distmerge.adamerging.config import load_ada_config

    auto = prepared(family, kind="auto")
    assert auto.kind == "encoder" and auto.excluded() == () and auto.pooling == "mean"
    assert load_ada_config(auto.to_dict()).to_dict() == auto.to_dict()  # the workers rebuild it from to_dict
    cls = prepared(family, pooling="cls")
    swapped = prepared(family, heads={"alpha": family["heads"]["beta"], "beta": family["heads"]["alpha"]})
    assert len({auto.run_key(1), cls.run_key(1), swapped.run_key(1)}) == 3
    plain = load_ada_config(ada_config(family, kind="causal", heads=None))
    assert "heads" not in plain.to_dict() and "pooling" not in plain.to_dict()  # older run keys unchanged


# --- the objective ----------------------------------------------------------------------------------------


def hand_logits(weights: dict[str, torch.Tensor], head: dict[str, torch.Tensor], encoded, pooling: str):
    """A real BertModel with the weights loaded, sentence-transformers' mean pooling written out, the head."""
    from transformers import BertModel

    model = BertModel(bert_config(), add_pooling_layer=False).eval()
    hidden = torch.func.functional_call(model, weights, args=(), kwargs=dict(encoded), strict=False).last_hidden_state
    if pooling == "cls":
        pooled = hidden[:, 0]
    else:
        mask = encoded["attention_mask"].float()
        pooled = torch.stack([hidden[i][mask[i] > 0].mean(0) for i in range(hidden.shape[0])])
    return pooled @ head["weight"].T + head["bias"]


def test_batch_objective_is_the_encoder_pooled_head_entropy(family):
    from distmerge.adamerging.objective import ENCODER_HEAD_PREFIX, batch_objective, skeleton
    from distmerge.evaluate.models import ModelSource, load_tokenizer

    model = skeleton(family["base"], "encoder")
    assert not any(n.startswith("pooler.") for n, _ in model.named_parameters())
    weights = state(family["experts"]["alpha"])
    head = load_file(family["heads"]["alpha"])
    tokenizer = load_tokenizer(ModelSource(path=family["base"]), "right")
    encoded = dict(tokenizer(family["data"]["alpha"], padding=True, return_tensors="pt"))
    assert (encoded["attention_mask"] == 0).any()
    params = {**weights, **{ENCODER_HEAD_PREFIX + k: v for k, v in head.items()}}
    values = {}
    for pooling in ("mean", "cls"):
        values[pooling] = batch_objective(model, params, encoded, "encoder", "entropy", 5, pooling=pooling)
        expected = entropy(hand_logits(weights, head, encoded, pooling)).sum() / 5
        torch.testing.assert_close(values[pooling], expected, atol=1e-5, rtol=1e-5)
    assert abs(float(values["mean"] - values["cls"])) > 1e-3


def reference_gradient(family) -> torch.Tensor:
    """Layer-wise coefficients, theta0 + sum_t lambda_t tau_t written out on full state dicts, each task's
    batches of 4 through the merged encoder and that task's head, entropies summed / batch size."""
    from distmerge.evaluate.models import ModelSource, load_tokenizer

    base = state(family["base"])
    names = sorted(base)
    taus = [{n: state(family["experts"][t])[n] - base[n] for n in names} for t in TASKS]
    raw = torch.full((len(names), len(TASKS)), 0.3, requires_grad=True)
    lam = raw.clamp(0, 1)
    merged = {n: base[n] + sum(lam[i, t] * taus[t][n] for t in range(len(TASKS))) for i, n in enumerate(names)}
    tokenizer = load_tokenizer(ModelSource(path=family["base"]), "right")
    total = 0.0
    for task in TASKS:
        head = load_file(family["heads"][task])
        for start in (0, 4):
            encoded = dict(tokenizer(family["data"][task][start:start + 4], padding=True, truncation=True,
                                     max_length=16, return_tensors="pt"))
            total = total + entropy(hand_logits(merged, head, encoded, "mean")).sum() / 4
    total.backward()
    return raw.grad


def test_step_gradients_match_the_reference(family):
    from distmerge.adamerging.train import build_setup, encode_rows, step_objective

    setup = build_setup(prepared(family))
    assert set(setup.plan.names) == set(state(family["base"]))  # encoders: every tensor merged, nothing fixed
    batches = {t: [encode_rows(setup, t, {"text": np.array(family["data"][t][b:b + 4])}) for b in (0, 4)]
               for t in TASKS}
    step_objective(setup, batches, 4).backward()
    gradient = setup.coefficients.raw.grad
    assert gradient.abs().max() > 1e-4
    torch.testing.assert_close(gradient, reference_gradient(family), atol=1e-6, rtol=1e-4)
