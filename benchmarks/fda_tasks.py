"""Synthetic tasks with real skills, a tiny Llama, its training loop and greedy exact-match evaluation.

Used by ``fda_quality.py``. One shared vocabulary of whole-word tokens; every example is
``<s> TASK x1 .. xL > y1 .. yM </s>`` and the loss is taken on ``y1 .. yM </s>`` only. Examples are split
into train / validation / test by a hash of their prompt, so held-out prompts are never trained on.

Tasks:
  copy     letters or digits, copied (the base model's "pretraining" skill: the format, attending to inputs)
  reverse  letters, reversed
  sort     letters, sorted (repeats allowed)
  add      two 3-digit strings, added digit by digit mod 10 (no carries): a lookup table per aligned pair
           of positions, i.e. modular addition
  shift    letters, each replaced by the next one in the alphabet (wrapping)
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
LETTERS = tuple("abcdefghijklmnop")
DIGITS = tuple("0123456789")
MARKERS = ("copy", "reverse", "sort", "add", "shift")
SEPARATORS = (">", "|")
VOCAB = SPECIALS + MARKERS + SEPARATORS + LETTERS + DIGITS
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
BOS, EOS, PAD = TOKEN_ID["<s>"], TOKEN_ID["</s>"], TOKEN_ID["<pad>"]
IGNORE = -100
ADD_DIGITS = 3

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]  # <s> TASK ... >
    target: tuple[int, ...]  # y1 .. yM </s>


def _ids(tokens) -> tuple[int, ...]:
    return tuple(TOKEN_ID[t] for t in tokens)


def _copy(rng: random.Random) -> tuple[list[str], list[str]]:
    alphabet = LETTERS if rng.random() < 0.5 else DIGITS
    xs = [rng.choice(alphabet) for _ in range(rng.randint(3, 8))]
    return xs, list(xs)


def _reverse(rng: random.Random) -> tuple[list[str], list[str]]:
    xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    return xs, xs[::-1]


def _sort(rng: random.Random) -> tuple[list[str], list[str]]:
    xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    return xs, sorted(xs)


def _add(rng: random.Random) -> tuple[list[str], list[str]]:
    # One length: with RoPE the offsets to the two digits then stay fixed, which a small model learns
    # reliably; with lengths 2-4 fine-tuning sat on a loss plateau for 400 steps in one of two tries.
    a = [rng.choice(DIGITS) for _ in range(ADD_DIGITS)]
    b = [rng.choice(DIGITS) for _ in range(ADD_DIGITS)]
    return a + ["|"] + b, [str((int(x) + int(y)) % 10) for x, y in zip(a, b)]


def _shift(rng: random.Random) -> tuple[list[str], list[str]]:
    xs = [rng.choice(LETTERS) for _ in range(rng.randint(3, 8))]
    return xs, [LETTERS[(LETTERS.index(x) + 1) % len(LETTERS)] for x in xs]


GENERATORS = {"copy": _copy, "reverse": _reverse, "sort": _sort, "add": _add, "shift": _shift}
TASKS = tuple(GENERATORS)
MAX_LEN = 24  # longest example: <s> reverse 8 letters > 8 letters </s> = 20 tokens


def split_of(prompt: tuple[int, ...]) -> str:
    """train (80%), validation (10%) or test (10%), fixed by the prompt itself, the same for every seed."""
    bucket = hashlib.sha256(bytes(prompt)).digest()[0] % 10
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def make_example(task: str, rng: random.Random) -> Example:
    inputs, outputs = GENERATORS[task](rng)
    return Example(prompt=_ids(["<s>", task, *inputs, ">"]), target=_ids([*outputs, "</s>"]))


def draw_from_split(draw, key, split: str, count: int, *, unique: bool, what: str) -> list:
    """``count`` results of ``draw()`` whose ``key`` falls in ``split`` (distinct keys when ``unique``)."""
    out: list = []
    seen: set[tuple[int, ...]] = set()
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 200 * count + 10_000:
            raise RuntimeError(f"cannot draw {count} distinct {split} {what}")
        item = draw()
        ids = key(item)
        if split_of(ids) != split or (unique and ids in seen):
            continue
        seen.add(ids)
        out.append(item)
    return out


def sample(task: str, split: str, count: int, seed: int, *, unique: bool = False) -> list[Example]:
    """``count`` examples of ``task`` whose prompts fall in ``split``; distinct prompts when ``unique``."""
    rng = random.Random(f"{task}/{split}/{seed}")
    return draw_from_split(lambda: make_example(task, rng), lambda e: e.prompt, split, count, unique=unique,
                           what=f"examples of {task!r}")


# --- model ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256

    def config(self):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(VOCAB), hidden_size=self.hidden, intermediate_size=self.intermediate,
                           num_hidden_layers=self.layers, num_attention_heads=self.heads,
                           num_key_value_heads=self.heads, max_position_embeddings=MAX_LEN * 2,
                           tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def new_model(shape: ModelShape, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(shape.config()).float()


def tokenizer():
    """A word-level tokenizer over VOCAB, saved with every model so the folders are complete HF models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def save(model, path: Path) -> Path:
    model.save_pretrained(str(path), max_shard_size="200KB")
    tokenizer().save_pretrained(str(path))
    return path


def load(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


# --- training ---------------------------------------------------------------------------------------------

def collate(examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (loss on the target tokens only)."""
    width = max(len(e.prompt) + len(e.target) for e in examples)
    ids = torch.full((len(examples), width), PAD, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        sequence = e.prompt + e.target
        ids[row, :len(sequence)] = torch.tensor(sequence)
        mask[row, :len(sequence)] = 1
        labels[row, len(e.prompt):len(sequence)] = torch.tensor(e.target)
    return ids, mask, labels


@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int = 64
    warmup: int = 50
    weight_decay: float = 0.0
    trainable: str = "all"  # all | mlp: only the decoder layers' MLP weights move (the part FDA adapts)


def train(model, mixture: dict[str, float], settings: TrainSettings, seed: int, log=None) -> list[float]:
    """AdamW on fresh training examples drawn from ``mixture`` (task -> weight); cosine decay after warm-up.

    Examples are drawn on the fly (the training split of each task is far larger than the steps see), so
    there is no memorisation of a fixed set; the held-out prompts are excluded by ``split_of``.
    """
    rng = random.Random(f"train/{seed}/{sorted(mixture.items())}")
    tasks, weights = zip(*sorted(mixture.items()))
    if settings.trainable not in ("all", "mlp"):
        raise ValueError(f"trainable: {settings.trainable!r} is not one of all, mlp")
    params = []
    for name, param in model.named_parameters():
        param.requires_grad_(settings.trainable == "all" or ".mlp." in name)
        if param.requires_grad:
            params.append(param)
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                                  betas=(0.9, 0.98))

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    losses = []
    for step in range(settings.steps):
        batch = []
        while len(batch) < settings.batch_size:
            example = make_example(rng.choices(tasks, weights)[0], rng)
            if split_of(example.prompt) == "train":
                batch.append(example)
        ids, mask, labels = collate(batch)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, settings.steps // 5) == 0:
            log(f"    step {step + 1}/{settings.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    return losses


# --- evaluation -------------------------------------------------------------------------------------------

@torch.no_grad()
def greedy_scores(model, examples: list[Example], batch_size: int = 256) -> dict[str, float]:
    """Exact match (the whole target and </s>, greedy) and per-token accuracy of the greedy output.

    Prompts of one length are decoded together without padding; generation runs for exactly len(target)
    tokens (the last must be </s>), so a model that keeps talking or stops early fails the exact match.
    """
    by_shape: dict[tuple[int, int], list[Example]] = {}
    for e in examples:
        by_shape.setdefault((len(e.prompt), len(e.target)), []).append(e)
    exact = tokens_right = tokens = 0
    for (_, target_len), group in sorted(by_shape.items()):
        for start in range(0, len(group), batch_size):
            chunk = group[start:start + batch_size]
            ids = torch.tensor([e.prompt for e in chunk])
            for _ in range(target_len):
                next_ids = model(input_ids=ids).logits[:, -1].argmax(-1)
                ids = torch.cat([ids, next_ids[:, None]], dim=1)
            produced = ids[:, -target_len:]
            wanted = torch.tensor([e.target for e in chunk])
            right = produced == wanted
            exact += int(right.all(dim=1).sum())
            tokens_right += int(right.sum())
            tokens += right.numel()
    return {"exact": exact / len(examples), "token": tokens_right / tokens}
