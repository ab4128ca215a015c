"""The shared mini-batch loop: every sample once an epoch, in the order the generator draws, one
optimizer step per mini-batch, the logged numbers averaged over the epoch."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rrcompile.training import run_epoch, task_loss


def test_an_epoch_visits_every_sample_once_in_the_drawn_order_and_steps_per_batch():
    x = np.arange(10, dtype=np.float32).reshape(10, 1)
    y = np.arange(10, dtype=np.int64)
    weight = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    seen = []

    def step(xb, yb):
        seen.append(yb.tolist())
        return weight * 1.0, {"size": float(len(yb))}

    means = run_epoch(step, optimizer, x, y, np.random.default_rng(7), batch_size=4, device=torch.device("cpu"),
                      progress=False)
    assert sum(seen, []) == np.random.default_rng(7).permutation(10).tolist()
    assert [len(batch) for batch in seen] == [4, 4, 2]
    assert means == {"size": pytest.approx(10 / 3)}
    assert float(weight.detach()) == pytest.approx(-3.0)  # one SGD step of gradient 1 per mini-batch


def test_task_loss_flattens_trailing_dimensions():
    logits = torch.tensor([[[[2.0]], [[0.0]]]])  # [N, C, 1, 1], as a convolutional head gives
    assert float(task_loss(logits, torch.tensor([0]))) == pytest.approx(
        float(torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))))
