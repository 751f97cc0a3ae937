"""The router: features of a prompt under the shared expert, and the reference's MLP from features to task logits.

Features are the mean of the shared model's last hidden state over the prompt's tokens (``router.py::
generate_router_datasets`` in the reference), the padding masked out and positions counted from each prompt's first
token, so a left-padded prompt (generation) has the features of the same prompt right-padded (training).
The MLP is Linear(d, 2d)-BatchNorm-LeakyReLU-Dropout twice, then Linear(2d, T), trained with cross-entropy on
task ids (AdamW, lr 5e-4, batch 1024, 50 epochs by default, as the reference's Trainer run). It is saved as
``router/model.safetensors`` + ``router/config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distmerge.errors import InputError
from distmerge.io.writer import write_json, write_safetensors
from distmerge.twin.folder import ROUTER


def prompt_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, hidden] float32: the mean last hidden state over each row's unmasked tokens."""
    mask = attention_mask.to(input_ids.device)
    inputs = {"input_ids": input_ids, "attention_mask": mask, "output_hidden_states": True}
    if model.can_generate():  # decoder: positions from each row's first real token, whatever the padding side
        inputs["position_ids"] = (mask.long().cumsum(-1) - 1).clamp(min=0)
        inputs["use_cache"] = False
    with torch.inference_mode():
        hidden = model(**inputs).hidden_states[-1].float()
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class RouterMLP(nn.Module):
    def __init__(self, features: int, tasks: int, dropout: float = 0.5):
        super().__init__()
        hidden = 2 * features
        self.net = nn.Sequential(
            nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, tasks))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


@dataclass
class TrainedRouter:
    model: RouterMLP
    tasks: list[str]
    train_accuracy: float
    holdout_accuracy: float | None
    holdout_per_task: dict[str, float]
    samples: dict[str, int]

    def report(self) -> dict[str, Any]:
        return {"train_accuracy": self.train_accuracy, "holdout_accuracy": self.holdout_accuracy,
                "holdout_per_task": self.holdout_per_task, "samples": self.samples}


def split_holdout(labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, held out): the same share of every task held out, chosen by a seeded permutation."""
    generator = np.random.default_rng(seed)
    train, held = [], []
    for task in np.unique(labels):
        rows = np.flatnonzero(labels == task)
        rows = rows[generator.permutation(len(rows))]
        count = int(round(holdout * len(rows)))
        count = min(count, len(rows) - 1)  # a task keeps at least one training sample
        held.append(rows[:count])
        train.append(rows[count:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def accuracy(model: RouterMLP, features: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(features).argmax(-1) == labels).float().mean()) if len(labels) else float("nan")


def train_router(features: np.ndarray, labels: np.ndarray, tasks: list[str], epochs: int = 50, lr: float = 5e-4,
                 batch_size: int = 1024, dropout: float = 0.5, holdout: float = 0.1, seed: int = 0,
                 device: str = "cpu", progress: bool = False) -> TrainedRouter:
    """The MLP fitted to (features, task index) with cross-entropy; accuracy on the held-out share reported.
    ``device``: cuda for a 14B model's hidden size (the MLP is 2d x 2d: 105M weights at d = 5120)."""
    import sys

    from tqdm import tqdm

    torch.manual_seed(seed)
    x = torch.as_tensor(features, dtype=torch.float32, device=device)
    y = torch.as_tensor(labels, dtype=torch.long, device=device)
    train_rows, held_rows = (torch.as_tensor(r, device=device) for r in split_holdout(labels, holdout, seed))
    model = RouterMLP(x.shape[1], len(tasks), dropout).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = x[train_rows], y[train_rows]
    for _ in tqdm(range(epochs), desc="twin router", unit="epoch", disable=not progress, file=sys.stderr):
        model.train()
        order = torch.randperm(len(train_y), generator=generator).to(device)
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            if len(rows) < 2:
                continue  # BatchNorm needs two samples to normalize over
            optimizer.zero_grad()
            loss_fn(model(train_x[rows]), train_y[rows]).backward()
            optimizer.step()
    held_x, held_y = x[held_rows], y[held_rows]
    per_task = {}
    for index, task in enumerate(tasks):
        rows = held_y == index
        if rows.any():
            per_task[task] = accuracy(model, held_x[rows], held_y[rows])
    train_accuracy = accuracy(model, train_x, train_y)
    held_accuracy = accuracy(model, held_x, held_y) if len(held_y) else None
    return TrainedRouter(model.to("cpu").eval(), list(tasks), train_accuracy, held_accuracy, per_task,
                         {task: int((y == i).sum()) for i, task in enumerate(tasks)})


def save_router(folder: Path, trained: TrainedRouter, dropout: float) -> None:
    target = folder / ROUTER
    target.mkdir(exist_ok=True)
    model = trained.model
    write_safetensors(dict(model.state_dict()), target / "model.safetensors")
    write_json(target / "config.json", {"features": model.net[0].in_features, "tasks": trained.tasks,
                                        "dropout": dropout, "feature": "mean last hidden state of the shared expert",
                                        **trained.report()})


def load_router(folder: str | Path) -> tuple[RouterMLP, list[str]]:
    from safetensors.torch import load_file

    target = Path(folder) / ROUTER
    try:
        config = json.loads((target / "config.json").read_text())
        state = load_file(str(target / "model.safetensors"))
    except Exception as exc:
        raise InputError(f"'{target}': unreadable router ({type(exc).__name__}: {exc})") from None
    model = RouterMLP(int(config["features"]), len(config["tasks"]), float(config.get("dropout", 0.5)))
    model.load_state_dict(state)
    return model.eval(), list(config["tasks"])
