"""The mini-batch loop every trainer shares: the fine-tune (``rrcompile.finetune``) and the
compensation training (``rrcompile.compensation_training``) differ in what a step computes and in
what they do between epochs, not in how an epoch walks the data.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

BATCH_SIZE = 128  # training mini-batch, images


@dataclasses.dataclass
class TrainingConfig:
    """The options every trainer takes; each trainer's config adds its own (and its own epochs)."""
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = BATCH_SIZE
    seed: int = 0
    # where torch trains: cpu, cuda, or auto (CUDA when torch sees a GPU)
    device_type: str = "auto"


# a step: (inputs, labels) of one mini-batch -> (the loss to minimize, the numbers to log of it)
Step = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, dict[str, float]]"]


def run_epoch(step: Step, optimizer: torch.optim.Optimizer, x: np.ndarray, y: np.ndarray, rng: np.random.Generator, *,
              batch_size: int, device: torch.device, desc: str | None = None, progress: bool = True) -> dict[str, float]:
    """One pass over ``x``, ``y`` in an order drawn from ``rng``, ``batch_size`` samples a step; the
    optimizer steps on each mini-batch's loss. Returns the mean over the epoch of each logged number."""
    order = rng.permutation(len(y))
    logged: dict[str, list[float]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        index = order[start:start + batch_size]
        loss, values = step(torch.from_numpy(x[index]).to(device), torch.from_numpy(y[index]).to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for name, value in values.items():
            logged.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in logged.items()}


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of a classifier's logits, whatever trailing dimensions its output has."""
    return torch.nn.functional.cross_entropy(logits.reshape(len(labels), -1), labels)
