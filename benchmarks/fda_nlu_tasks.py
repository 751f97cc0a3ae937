"""Synthetic classification tasks that need an encoder, a tiny RoBERTa, MLM pretraining, fine-tuning, accuracy.

Used by ``fda_quality_nlu.py``. One word-level vocabulary (RoBERTa's specials, then 12 letters in three
groups a-d, e-h, i-l); every input is ``<s> x1 .. xL </s>`` with 6 <= L <= 12 letters. Inputs are split into
train / validation / test by a hash of their token ids, the same for every seed, so held-out inputs are never
trained on.

Tasks (each with its own label set and, at fine-tuning, its own head on the ``<s>`` token):
  majority3   which letter group occurs most often (3 labels; ties are not drawn)
  sorted      are the letters non-decreasing (negatives: half random, half sorted with one adjacent swap)
  first_last  is the last letter the first one
  repeat      do two adjacent letters repeat
Only ``majority3`` can be read from a bag of tokens; the other three depend on order or position.

Pretraining corpus for masked-language modelling: sequences from a mixture of structured generators (sorted,
periodic, palindromic, group-dominated, first==last, random), so that context predicts masked letters and the
base learns order, position and counting features without seeing any task label.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from fda_tasks import draw_from_split, split_of  # the same hash split for both benchmarks

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")  # RoBERTa's ids: bos 0, pad 1, eos 2, unk 3
LETTERS = tuple("abcdefghijkl")
GROUPS = (LETTERS[0:4], LETTERS[4:8], LETTERS[8:12])
VOCAB = SPECIALS + LETTERS
TOKEN_ID = {token: i for i, token in enumerate(VOCAB)}
BOS, PAD, EOS, UNK, MASK = (TOKEN_ID[t] for t in SPECIALS)
LETTER_IDS = tuple(TOKEN_ID[t] for t in LETTERS)
MIN_LEN, MAX_LETTERS = 6, 12
MAX_LEN = MAX_LETTERS + 2
IGNORE = -100
SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]  # <s> x1 .. xL </s>
    label: int


# --- task generators: (rng) -> (letters, label) ------------------------------------------------------------

def _letters(rng: random.Random, n: int | None = None) -> list[str]:
    return [rng.choice(LETTERS) for _ in range(n or rng.randint(MIN_LEN, MAX_LETTERS))]


def _group_counts(xs: list[str]) -> list[int]:
    return [sum(x in group for x in xs) for group in GROUPS]


def _majority3(rng: random.Random) -> tuple[list[str], int]:
    while True:
        xs = _letters(rng)
        counts = _group_counts(xs)
        top = max(counts)
        if counts.count(top) == 1:
            return xs, counts.index(top)


def _is_sorted(xs: list[str]) -> bool:
    return all(a <= b for a, b in zip(xs, xs[1:]))


def _sorted(rng: random.Random) -> tuple[list[str], int]:
    if rng.random() < 0.5:
        return sorted(_letters(rng)), 1
    if rng.random() < 0.5:
        while True:
            xs = _letters(rng)
            if not _is_sorted(xs):
                return xs, 0
    while True:  # the hard negatives: sorted but for one adjacent swap
        xs = sorted(_letters(rng))
        i = rng.randrange(len(xs) - 1)
        if xs[i] != xs[i + 1]:
            xs[i], xs[i + 1] = xs[i + 1], xs[i]
            return xs, 0


def _first_last(rng: random.Random) -> tuple[list[str], int]:
    xs = _letters(rng)
    if rng.random() < 0.5:
        xs[-1] = xs[0]
        return xs, 1
    xs[-1] = rng.choice([x for x in LETTERS if x != xs[0]])
    return xs, 0


def _no_repeats(rng: random.Random, n: int) -> list[str]:
    xs = [rng.choice(LETTERS)]
    while len(xs) < n:
        xs.append(rng.choice([x for x in LETTERS if x != xs[-1]]))
    return xs


def _repeat(rng: random.Random) -> tuple[list[str], int]:
    n = rng.randint(MIN_LEN, MAX_LETTERS)
    xs = _no_repeats(rng, n)
    if rng.random() < 0.5:
        return xs, 0
    i = rng.randrange(n - 1)  # exactly one adjacent pair repeats
    xs[i + 1] = xs[i]
    if i + 2 < n and xs[i + 2] == xs[i + 1]:
        xs[i + 2] = rng.choice([x for x in LETTERS if x != xs[i + 1] and (i + 3 >= n or x != xs[i + 3])])
    return xs, 1


GENERATORS = {"majority3": _majority3, "sorted": _sorted, "first_last": _first_last, "repeat": _repeat}
NUM_LABELS = {"majority3": 3, "sorted": 2, "first_last": 2, "repeat": 2}
TASKS = tuple(GENERATORS)


def encode(letters: list[str]) -> tuple[int, ...]:
    return (BOS, *(TOKEN_ID[x] for x in letters), EOS)


def make_example(task: str, rng: random.Random) -> Example:
    letters, label = GENERATORS[task](rng)
    return Example(ids=encode(letters), label=label)


def sample(task: str, split: str, count: int, seed: int) -> list[Example]:
    """``count`` distinct inputs of ``task`` that fall in ``split``."""
    rng = random.Random(f"{task}/{split}/{seed}")
    return draw_from_split(lambda: make_example(task, rng), lambda e: e.ids, split, count, unique=True,
                           what=f"inputs of {task!r}")


# --- pretraining corpus ----------------------------------------------------------------------------------

def _periodic(rng: random.Random) -> list[str]:
    motif = _letters(rng, rng.randint(2, 4))
    n = rng.randint(MIN_LEN, MAX_LETTERS)
    return [motif[i % len(motif)] for i in range(n)]


def _palindrome(rng: random.Random) -> list[str]:
    half = _letters(rng, rng.randint(3, 6))
    return half + half[::-1][rng.randint(0, 1):]


def _group_heavy(rng: random.Random) -> list[str]:
    group = rng.choice(GROUPS)
    return [rng.choice(group) if rng.random() < 0.7 else rng.choice(LETTERS)
            for _ in range(rng.randint(MIN_LEN, MAX_LETTERS))]


def _bookends(rng: random.Random) -> list[str]:
    xs = _letters(rng)
    xs[-1] = xs[0]
    return xs


CORPUS = {"sorted": lambda rng: sorted(_letters(rng)), "periodic": _periodic, "palindrome": _palindrome,
          "group_heavy": _group_heavy, "bookends": _bookends, "random": _letters}


def corpus_sequence(rng: random.Random) -> tuple[int, ...]:
    return encode(CORPUS[rng.choice(sorted(CORPUS))](rng))


# --- model -----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    hidden: int = 64
    layers: int = 4
    heads: int = 4
    intermediate: int = 256

    def config(self, num_labels: int = 2):
        from transformers import RobertaConfig

        return RobertaConfig(vocab_size=len(VOCAB), hidden_size=self.hidden, num_hidden_layers=self.layers,
                             num_attention_heads=self.heads, intermediate_size=self.intermediate,
                             max_position_embeddings=MAX_LEN + PAD + 1, type_vocab_size=1,
                             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels,
                             bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS)


def new_mlm_model(shape: ModelShape, seed: int):
    from transformers import RobertaForMaskedLM

    torch.manual_seed(seed)
    return RobertaForMaskedLM(shape.config()).float()


def new_head(encoder_config, num_labels: int, seed: int):
    """RoBERTa's sequence-classification head (dense, tanh, out_proj on the <s> token), freshly initialized."""
    import copy

    from transformers.models.roberta.modeling_roberta import RobertaClassificationHead

    config = copy.deepcopy(encoder_config)
    config.num_labels = num_labels
    torch.manual_seed(seed)
    head = RobertaClassificationHead(config)
    for module in head.modules():
        if isinstance(module, torch.nn.Linear):  # RoBERTa's own init (std = initializer_range)
            module.weight.data.normal_(0.0, config.initializer_range)
            module.bias.data.zero_()
    return head.float()


def tokenizer():
    """A word-level tokenizer over VOCAB, saved with every encoder so the folders are complete HF models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(dict(TOKEN_ID), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", mask_token="<mask>")


def save_encoder(encoder, path: Path) -> Path:
    """The encoder alone (``RobertaModel``, no pooler, no head): what the merges and FDA read."""
    encoder.save_pretrained(str(path), max_shard_size="200KB")
    tokenizer().save_pretrained(str(path))
    return path


def load_encoder(path: Path):
    from transformers import RobertaModel

    return RobertaModel.from_pretrained(str(path), dtype=torch.float32, add_pooling_layer=False).eval()


def save_head(head, path: Path) -> Path:
    from safetensors.torch import save_file

    save_file({n: t.contiguous() for n, t in head.state_dict().items()}, str(path))
    return path


def load_head(path: Path, encoder_config):
    from safetensors.torch import load_file

    state = load_file(str(path))
    head = new_head(encoder_config, state["out_proj.weight"].shape[0], 0)
    head.load_state_dict(state)
    return head.eval()


# --- batches ---------------------------------------------------------------------------------------------

def pad(sequences: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, s in enumerate(sequences):
        ids[row, :len(s)] = torch.tensor(s)
        mask[row, :len(s)] = 1
    return ids, mask


def mask_for_mlm(ids: torch.Tensor, generator: torch.Generator, rate: float = 0.15):
    """BERT's masking of letters only: of the chosen 15%, 80% <mask>, 10% a random letter, 10% unchanged."""
    letters = ids >= len(SPECIALS)
    chosen = (torch.rand(ids.shape, generator=generator) < rate) & letters
    labels = torch.where(chosen, ids, torch.full_like(ids, IGNORE))
    roll = torch.rand(ids.shape, generator=generator)
    inputs = ids.clone()
    inputs[chosen & (roll < 0.8)] = MASK
    randomized = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[randomized] = torch.tensor(LETTER_IDS)[torch.randint(len(LETTER_IDS), (int(randomized.sum()),),
                                                                  generator=generator)]
    return inputs, labels


# --- training --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainSettings:
    steps: int
    lr: float
    batch_size: int = 64
    warmup_fraction: float = 0.06
    weight_decay: float = 0.01


def _optimizer(params, settings: TrainSettings):
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.98))
    warmup = max(1, int(settings.warmup_fraction * settings.steps))

    def lr_at(step: int) -> float:  # linear warm-up then linear decay, as RoBERTa's fine-tuning recipe
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (settings.steps - step) / max(1, settings.steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)


def _train(modules, params, settings: TrainSettings, batch_loss, log, label: str, reports: int) -> list[float]:
    """``settings.steps`` AdamW steps on ``batch_loss()`` (a fresh batch each call), clipped, with the schedule
    of ``_optimizer``; modules in train mode meanwhile."""
    optimizer, scheduler = _optimizer(params, settings)
    for module in modules:
        module.train()
    losses = []
    for step in range(settings.steps):
        loss = batch_loss()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(1, settings.steps // reports) == 0:
            log(f"    {label} step {step + 1}/{settings.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    for module in modules:
        module.eval()
    return losses


def _train_batch(settings: TrainSettings, draw, key) -> list:
    """``settings.batch_size`` fresh draws whose ``key`` falls in the training split."""
    batch = []
    while len(batch) < settings.batch_size:
        item = draw()
        if split_of(key(item)) == "train":
            batch.append(item)
    return batch


def pretrain_mlm(model, settings: TrainSettings, seed: int, log=None) -> list[float]:
    """Masked-language modelling on fresh corpus sequences (training split only)."""
    rng = random.Random(f"mlm/{seed}")
    generator = torch.Generator().manual_seed(seed)

    def batch_loss():
        ids, mask = pad(_train_batch(settings, lambda: corpus_sequence(rng), lambda ids: ids))
        inputs, labels = mask_for_mlm(ids, generator)
        return model(input_ids=inputs, attention_mask=mask, labels=labels).loss

    return _train([model], list(model.parameters()), settings, batch_loss, log, "MLM", 5)


def classify(encoder, head, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return head(encoder(input_ids=ids, attention_mask=mask).last_hidden_state)


def finetune(encoder, head, task: str, settings: TrainSettings, seed: int, log=None) -> list[float]:
    """All weights of encoder and head, cross-entropy on fresh training inputs of ``task``."""
    rng = random.Random(f"finetune/{task}/{seed}")

    def batch_loss():
        batch = _train_batch(settings, lambda: make_example(task, rng), lambda example: example.ids)
        ids, mask = pad([e.ids for e in batch])
        labels = torch.tensor([e.label for e in batch])
        return torch.nn.functional.cross_entropy(classify(encoder, head, ids, mask), labels)

    params = list(encoder.parameters()) + list(head.parameters())
    return _train([encoder, head], params, settings, batch_loss, log, task, 4)


@torch.no_grad()
def accuracy(encoder, head, examples: list[Example], batch_size: int = 512) -> float:
    right = 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, mask = pad([e.ids for e in chunk])
        predicted = classify(encoder, head, ids, mask).argmax(-1)
        right += int((predicted == torch.tensor([e.label for e in chunk])).sum())
    return right / len(examples)


def majority_baseline(examples: list[Example]) -> float:
    labels = [e.label for e in examples]
    return max(labels.count(v) for v in set(labels)) / len(labels)


def tail_mean(values: list[float], n: int = 50) -> float:
    tail = values[-n:]
    return round(sum(tail) / max(1, len(tail)), 5) if tail else math.nan
