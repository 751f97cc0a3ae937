"""``distmerge measure regmean`` and ``method: regmean`` end to end on a tiny Llama family (one Ray session), and the
measurement's config checks (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmerge.errors import ConfigError, InputError
from distmerge.measure import stats
from distmerge.measure.config import load_measure_config
from test_ops_next import close

WORDS = [" ".join(f"w{(7 * i + 3 * j) % 120 + 4}" for j in range(3 + i % 6)) for i in range(12)]


def write_data(folder: Path, name: str, offset: int) -> Path:
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"text": WORDS[(i + offset) % len(WORDS)]}) + "\n" for i in range(9)))
    return path


def reference_grams(model_path: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """X^T X per linear layer with each text run alone (no padding at all), in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    grams: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name != "lm_head":
            def hook(module, inputs, output, name=name):
                x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
                grams[name] = grams.get(name, 0) + x.T @ x
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for text in texts:
            model(**tokenizer(text, return_tensors="pt"))
    return grams


@pytest.fixture(scope="module")
def measured(llama_family, tmp_path_factory, ray_cluster):
    from distmerge.measure.regmean import measure

    _, experts = llama_family
    root = tmp_path_factory.mktemp("measure")
    data = [write_data(root, f"e{i}", 4 * i) for i in range(len(experts))]
    config = {"tasks": [{"name": f"e{i}", "model": str(p), "data": str(d)} for i, (p, d) in
                        enumerate(zip(experts, data))], "batch_size": 4, "max_length": 16}
    result = measure(config, root / "stats", workers=1, progress=False)
    return root, config, data, result


def test_measured_grams_match_a_single_process_reference_and_resume(measured, llama_family):
    root, config, data, result = measured
    _, experts = llama_family
    assert result.skipped == 0 and set(result.tokens) == {"e0", "e1"}
    texts = [json.loads(line)["text"] for line in data[1].read_text().splitlines()]
    expected = reference_grams(experts[1], texts)
    manifest = stats.load_manifest(root / "stats", "e1", "regmean")
    tokens = sum(len(t.split()) for t in texts)  # one token per word, no specials: padding would add more
    assert set(expected) <= set(manifest["layers"])
    for name, gram in expected.items():
        assert manifest["layers"][name]["tokens"] == tokens
        close(stats.read_gram(manifest["grams_path"], name), gram, atol=1e-5 * float(gram.abs().max()))
    assert manifest["fingerprint"] == stats.model_fingerprint(__import__("distmerge.io.checkpoint", fromlist=["x"])
                                                               .Checkpoint(str(experts[1]), "e1"))
    from distmerge.measure.regmean import measure

    again = measure(config, root / "stats", progress=False)  # every task committed: nothing measured
    assert again.skipped == 2 and again.tokens == {}


def test_regmean_merge_reads_the_statistics_and_refuses_foreign_ones(measured, llama_family, tmp_path):
    from distmerge.engine.driver import merge
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.ops.regmean import regmean_linear

    root, _, _, _ = measured
    _, experts = llama_family
    config = {"models": [{"model": str(p), "name": f"e{i}"} for i, p in enumerate(experts)], "method": "regmean",
              "parameters": {"statistics": str(root / "stats")}, "out_shard_size": "40KB"}
    merge(config, tmp_path / "out", workers=2, progress=False)
    out = Checkpoint(str(tmp_path / "out"), "out")
    sources = [Checkpoint(str(p), f"e{i}") for i, p in enumerate(experts)]
    name = "model.layers.1.mlp.down_proj"
    grams = []
    for i in range(2):
        manifest = stats.load_manifest(root / "stats", f"e{i}", "regmean")
        grams.append(stats.read_gram(manifest["grams_path"], name) / manifest["layers"][name]["tokens"])
    expected = regmean_linear([s.read(f"{name}.weight").float() for s in sources], grams, 0.9)
    close(out.read(f"{name}.weight").float(), expected, atol=1e-5)
    norm = "model.layers.1.input_layernorm.weight"
    close(out.read(norm).float(), (sources[0].read(norm).float() + sources[1].read(norm).float()) / 2)
    swapped = {**config, "models": [{"model": str(experts[1]), "name": "e0"}, {"model": str(experts[0]), "name": "e1"}]}
    with pytest.raises(InputError, match=f"{root / 'stats' / 'e0'}.*another model"):
        merge(swapped, tmp_path / "foreign", workers=1, progress=False)
    assert not (tmp_path / "foreign").exists()


def test_measure_config_refuses_bad_input(tmp_path, llama_family):
    _, experts = llama_family
    data = write_data(tmp_path, "d", 0)
    good = {"model": str(experts[0]), "data": str(data)}
    cases = [
        ({"tasks": []}, "tasks"),
        ({"tasks": [{**good, "model": str(tmp_path / "nope")}]}, "tasks[0].model"),
        ({"tasks": [{**good, "data": str(tmp_path / "nope.jsonl")}]}, "tasks[0].data"),
        ({"tasks": [{**good, "name": "a/b"}]}, "tasks[0].name"),
        ({"tasks": [good, good]}, "used twice"),
        ({"tasks": [good], "stats_dtype": "int8"}, "stats_dtype"),
        ({"tasks": [good], "batch_size": 0}, "batch_size"),
        ({"tasks": [{**good, "colour": 1}]}, "tasks[0].colour"),
    ]
    for raw, message in cases:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_measure_config(raw, "regmean")
    from distmerge.measure.regmean import measure

    with pytest.raises(InputError, match="no column 'body'"):
        measure({"tasks": [{**good, "text_field": "body"}]}, tmp_path / "stats", progress=False)
    assert not (tmp_path / "stats" / "expert_0").exists()


def test_regmean_check_models_compares_fingerprints(llama_family, tmp_path):
    """The driver-side check: a manifest records its expert's fingerprint; another checkpoint is refused."""
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.methods import build_method

    _, experts = llama_family
    mine, other = Checkpoint(str(experts[0]), "e0"), Checkpoint(str(llama_family[0]), "e0")
    stats.commit_task(tmp_path, "e0", {}, {"kind": "regmean", "task": "e0", "model": str(experts[0]),
                                           "fingerprint": stats.model_fingerprint(mine), "layers": {}})
    method = build_method("regmean", {"statistics": str(tmp_path)})
    method.check_models({"e0": mine})
    other.tensors = {**other.tensors}
    other.tensors.popitem()  # a different tensor listing
    with pytest.raises(InputError, match=f"{tmp_path / 'e0' / 'manifest.json'}.*not on model 'e0'"):
        method.check_models({"e0": other})


def test_encoder_model_class_names_the_layers_as_a_bare_encoder_checkpoint_does(tmp_path):
    """Experts that are bare encoders (heads kept apart, as sentence-transformers ships them): `model_class:
    encoder` loads them without a head, so every Linear of the checkpoint is measured under its stored name."""
    import torch
    from transformers import BertConfig, BertModel

    from distmerge.evaluate import models
    from distmerge.io.checkpoint import Checkpoint
    from distmerge.measure.config import MODEL_CLASSES
    from distmerge.measure.regmean import MODEL_KINDS, linear_modules

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(str(tmp_path / "enc"))
    stored = set(Checkpoint(str(tmp_path / "enc"), "enc").tensors)
    assert "encoder" in MODEL_CLASSES
    model = models.load_model(models.ModelSource(path=str(tmp_path / "enc")), MODEL_KINDS["encoder"])
    found = linear_modules(model, stored)
    linear_weights = {n for n in stored if n.endswith(".weight") and ("dense" in n or "self." in n)}
    assert {f"{name}.weight" for name in found} == linear_weights and len(found) == 2 * 6 + 1  # + the pooler
    # The sequence-classification class prefixes every name ("bert."): none would match the stored tensors.
    classifier = models.load_model(models.ModelSource(path=str(tmp_path / "enc")), MODEL_KINDS["sequence_classification"])
    assert linear_modules(classifier, stored) == {}


def test_the_next_experts_actors_load_early_only_where_the_reads_still_find_a_cpu():
    """On 2 CPUs with one 1-CPU actor per task, loading the next task's actor early took the CPU the current
    task's Ray Data reads needed: the measurement hung. It prefetches only where both pools and the reads fit."""
    from distmerge.measure.regmean import room_for_two_pools

    assert not room_for_two_pools(1, 1.0, 0.0, cpus=2, gpus=0)  # the hang above
    assert room_for_two_pools(1, 0.8, 0.0, cpus=4, gpus=0)  # the test cluster: 1.6 + 0.5 <= 4
    assert not room_for_two_pools(2, 1.0, 0.0, cpus=4, gpus=0)
    assert not room_for_two_pools(1, 1.0, 1.0, cpus=16, gpus=1)  # one GPU: the next model must wait for it
    assert room_for_two_pools(1, 1.0, 1.0, cpus=16, gpus=2)


def test_a_lora_expert_is_measured_and_evaluated_as_its_merged_model(llama_family, tmp_path):
    """An expert given as a PEFT adapter on its base (``BASE+ADAPTER`` or ``lora:``) loads, for the measurement's
    actors and the evaluator, as peft's merge_and_unload() of it: the same Grams and logits as that dense folder."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from distmerge.evaluate import models
    from distmerge.io.lora import open_checkpoint
    from distmerge.measure.regmean import GramActor

    base = llama_family[0]
    torch.manual_seed(3)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)),
                                LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                           target_modules=["q_proj", "v_proj", "down_proj"]))
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))
    dense = tmp_path / "dense"
    peft_model.merge_and_unload().save_pretrained(str(dense))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copy(base / name, dense / name)
    data = write_data(tmp_path, "d", 0)

    forms = [{"model": str(base), "lora": str(adapter)}, {"model": f"{base}+{adapter}"}]
    sources = {load_measure_config({"tasks": [{**form, "data": str(data)}]}, "regmean").tasks[0] for form in forms}
    assert len(sources) == 1
    task = sources.pop()
    assert task.model == f"{base.resolve()}+{adapter.resolve()}" and task.name == "adapter"
    with pytest.raises(ConfigError, match=r"tasks\[0\].lora: .* is not a PEFT adapter folder"):
        load_measure_config({"tasks": [{"model": str(base), "lora": str(dense), "data": str(data)}]}, "regmean")

    config = load_measure_config({"tasks": [{"model": str(dense), "data": str(data)}], "max_length": 16}, "regmean")
    texts = WORDS[:6]
    grams = []
    for model in (task.model, str(dense)):
        actor = GramActor(model, sorted(open_checkpoint(model, "e").tensors), config, "cpu", 1)
        actor.add(texts)
        grams.append(actor.totals()[0])
    assert grams[0].keys() == grams[1].keys() and len(grams[0]) > 5
    for name in grams[1]:
        close(grams[0][name], grams[1][name], 1e-9)
    plain = GramActor(str(base), sorted(open_checkpoint(str(base), "b").tensors), config, "cpu", 1)
    plain.add(texts)
    layer = "model.layers.1.mlp.down_proj"  # its inputs follow the adapted layers before it
    assert not torch.allclose(plain.totals()[0][layer], grams[0][layer], atol=1e-6)

    ids = torch.tensor([[1, 5, 9, 13, 2]])
    lora_model = models.load_model(models.ModelSource(path=task.model), "generate")
    want = AutoModelForCausalLM.from_pretrained(str(dense)).eval()(ids).logits
    torch.testing.assert_close(lora_model(ids).logits, want, atol=1e-5, rtol=0)
    assert models.load_tokenizer(models.ModelSource(path=task.model), "left") is not None
