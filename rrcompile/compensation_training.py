"""Training the compensation branches (the ONNX forms are ``rrcompile.compensation``'s): analog
weights frozen, a fresh chip for every mini-batch.

Only the candidates' down and up weights learn. Each step draws a new chip of the device (the
noise inputs of the varied graph, sampled in torch), runs the compensated network on it, and
minimizes

    cross-entropy(logits)  +  feature_weight * sum_l ||Y_l - Y_l*||^2 / ||Y_l*||^2

where ``Y_l`` is candidate ``l``'s compensated output on the varied chip and ``Y_l*`` the same
layer's output in the clean network without compensation: the term pulls every compensated
feature map toward the one the hardware should have produced, so each candidate learns to repair
its own layer (which the RL agent can then keep or drop on its own), while the task loss keeps
the whole network right.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from tqdm import tqdm

from rrcompile.compensation import candidates
from rrcompile.devices import DeviceConfig
from rrcompile.finetune import logits_model
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.torch_graph import TorchGraph, default_device, write_back
from rrcompile.training import TrainingConfig, run_epoch, task_loss


@dataclasses.dataclass
class CompensationConfig(TrainingConfig):
    epochs: int = 2
    feature_weight: float = 1.0


def train_compensation(model: onnx.ModelProto, device: DeviceConfig, x: np.ndarray, y: np.ndarray,
                       config: CompensationConfig, *, progress: bool = True) -> tuple[onnx.ModelProto, list[float]]:
    """(``model`` with trained compensation weights, mean loss per epoch); ``model`` holds candidates."""
    found = candidates(model)
    if not found:
        return model, []
    torch.manual_seed(config.seed)
    target = default_device(config.device_type)
    training = logits_model(model)
    trainable = [name for c in found for name in (c.down, c.up)]
    varied = TorchGraph(InsertVariationPass(device)(training).model, trainable=trainable).to(target)
    varied.seed(config.seed)
    clean = TorchGraph(training, trainable=[]).to(target)
    gates_off = {c.gate: torch.zeros((), device=target) for c in found}
    maps = [next(n.output[0] for n in model.graph.node if n.name == c.node) for c in found]
    optimizer = torch.optim.Adam([varied.parameter(name) for name in trainable], lr=config.lr)

    def step(xb: torch.Tensor, yb: torch.Tensor):
        result = varied(xb, outputs=[varied.output_names[0], *maps])
        loss = task_loss(result[varied.output_names[0]], yb)
        if config.feature_weight:
            with torch.no_grad():
                reference = clean(xb, gates_off, outputs=maps)
            for name in maps:
                loss = loss + config.feature_weight * ((result[name] - reference[name]) ** 2).sum() \
                    / (reference[name] ** 2).sum().clamp_min(1e-12)
        return loss, {"loss": float(loss.detach())}

    rng = np.random.default_rng([config.seed, 0xC0])
    history = []
    epochs = tqdm(range(config.epochs), desc="compensation", unit="epoch", disable=not progress, leave=False)
    for _ in epochs:
        history.append(run_epoch(step, optimizer, x, y, rng, batch_size=config.batch_size, device=target,
                                 progress=progress)["loss"])
        epochs.set_postfix(loss=f"{history[-1]:.4f}")
    return write_back(varied, model), history
