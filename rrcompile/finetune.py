"""Fine-tuning a canonical ONNX model in torch, and writing the weights back into its initializers.

Two remedies for weight variation share this loop:

- Lipschitz regularization (CorrectNet's error suppression, ``rrcompile.lipschitz``): the task
  loss plus a penalty on every analog layer's weight matrix.
- Noise injection (hardware-aware training as aihwkit users do it, the baseline): every forward
  pass runs on a freshly drawn chip of the given device, so the weights learn to tolerate it.

Both may be combined. Noise injection can also train *for calibration* (``calibration`` set, on a
model with calibration slots): every mini-batch's chip is calibrated on that batch in the forward
pass (``rrcompile.calibrate.calibrated_forward``), so the weights learn to tolerate the error that
per-chip calibration leaves, not the raw one, and the epoch is chosen on calibrated validation
chips, the starting model included (LeNet-5 at sigma 0.5 calibrates best as shipped: 98.33% over
10 chips, 98.31% after 2 epochs of this training at lr 1e-4, 97.84% after 2 of noise injection). The model is trained on its logits: a Softmax or LogSoftmax head is left out
of the training graph (a loss on probabilities saturates) but kept in the written model. The
validation split selects the epoch to keep: the best validation accuracy under
``validation_device`` (the mean over a fixed set of chips, through onnxruntime, so every epoch
faces the same chips) among the epochs whose clean validation accuracy stays within
``clean_tolerance`` of the starting model's; without a validation device, the best clean accuracy.
Training stops early after ``patience`` epochs without a better one.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import torch
from onnx import helper
from tqdm import tqdm

from rrcompile.calibrate import CALIBRATION_IMAGES, CalibratedEvaluator, CalibrationConfig, calibrated_forward, slots
from rrcompile.devices import DeviceConfig
from rrcompile.graph import analog_layers
from rrcompile.evaluate import MonteCarloEvaluator, accuracy
from rrcompile.lipschitz import LipschitzPenalty, SpectralReport
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.torch_graph import TorchGraph, default_device, trainable_initializers, write_back
from rrcompile.training import TrainingConfig, run_epoch, task_loss

PROBABILITY_HEADS = ("Softmax", "LogSoftmax")


@dataclasses.dataclass
class FinetuneConfig(TrainingConfig):
    """The fine-tune's options; ``device_type`` moves the training only: the validation chips stay
    on onnxruntime's CPU path, so the epoch kept does not depend on the machine."""
    val_fraction: float = 0.1
    patience: int = 3  # validation on a few chips is noisy: 2 stopped the VGG-style net at a dip
    lipschitz: LipschitzPenalty | None = None
    noise_injection: DeviceConfig | None = None
    validation_device: DeviceConfig | None = None
    validation_chips: int = 4
    clean_tolerance: float = 0.005
    calibration: CalibrationConfig | None = None  # train for calibration (with noise_injection)
    calibration_images: int = CALIBRATION_IMAGES  # per validation chip


@dataclasses.dataclass
class EpochLog:
    epoch: int  # 0 is the starting model
    loss: float | None  # mean task loss over the epoch's mini-batches
    penalty: float | None  # mean Lipschitz penalty (beta included)
    clean_val: float
    varied_val: float | None  # mean over the validation chips


@dataclasses.dataclass
class FinetuneResult:
    model: onnx.ModelProto
    history: list[EpochLog]
    best_epoch: int
    spectral_before: SpectralReport
    spectral_after: SpectralReport


def logits_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without a Softmax / LogSoftmax producing its single output (the same model otherwise)."""
    output = model.graph.output[0].name
    head = next((n for n in model.graph.node if output in n.output), None)
    if head is None or head.op_type not in PROBABILITY_HEADS:
        return model
    trimmed = onnx.ModelProto.FromString(model.SerializeToString())
    trimmed.graph.node.remove(next(n for n in trimmed.graph.node if n.name == head.name))
    del trimmed.graph.output[:]
    trimmed.graph.output.append(helper.make_tensor_value_info(head.input[0], onnx.TensorProto.FLOAT, None))
    return trimmed


def split_validation(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """(x_train, y_train, x_val, y_val): a seeded random ``fraction`` held out for validation."""
    order = np.random.default_rng([seed, 0x7A1]).permutation(len(y))
    n_val = max(1, int(round(fraction * len(y))))
    val, train = order[:n_val], order[n_val:]
    return x[train], y[train], x[val], y[val]


def _layer_weights(module: TorchGraph):
    return [(layer, module.weight(layer)) for layer in module.analog_layers]


def finetune(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, config: FinetuneConfig, *,
             progress: bool = True) -> FinetuneResult:
    """Fine-tune canonical ``model`` on prepared inputs ``x`` (fitted to its input) and labels ``y``."""
    torch.manual_seed(config.seed)
    device = default_device(config.device_type)
    x_train, y_train, x_val, y_val = split_validation(x, y, config.val_fraction, config.seed)
    base = logits_model(model)
    training = InsertVariationPass(config.noise_injection)(base).model if config.noise_injection is not None else base
    calibrating = slots(training) if config.calibration is not None else []
    if config.calibration is not None and (not calibrating or config.noise_injection is None):
        raise ValueError("training for calibration needs calibration slots in the model and a noise-injection device")
    # named on the model before variation: a tiled layer's bias is read after its tiles' sum, no
    # longer as the layer's own input; calibrated training learns the analog layers only (the
    # slots' parameters are solved, not learned)
    trainable = [name for layer in analog_layers(base) for name in (layer.weight, layer.bias) if name] \
        if calibrating else trainable_initializers(base)
    module = TorchGraph(training, trainable).to(device)
    module.seed(config.seed)
    optimizer = torch.optim.Adam([p for _, p in module.named_onnx_parameters()], lr=config.lr)
    spectral_before = SpectralReport.of(_layer_weights(module))

    def validate(epoch: int, loss: float | None, penalty: float | None) -> EpochLog:
        current = write_back(module, model)
        if config.validation_device is None:
            return EpochLog(epoch, loss, penalty, accuracy(current, x_val, y_val), None)
        if calibrating:
            _, stats = CalibratedEvaluator(current, config.validation_device, x_train[:config.calibration_images],
                                           config.calibration).evaluate(x_val, y_val, config.validation_chips,
                                                                        config.seed, progress=False)
        else:
            evaluator = MonteCarloEvaluator(current, config.validation_device)
            stats = evaluator.evaluate(x_val, y_val, config.validation_chips, config.seed, progress=False)
        return EpochLog(epoch, loss, penalty, stats.clean_accuracy, stats.mean)

    history = [validate(0, None, None)]
    floor = history[0].clean_val - config.clean_tolerance
    best_epoch, best_state, since_best = None, None, 0
    if calibrating:  # a network may already be at its best once calibrated: the start competes
        best_epoch, best_state = 0, {k: v.detach().clone() for k, v in module.state_dict().items()}

    def step(xb: torch.Tensor, yb: torch.Tensor):
        logits = calibrated_forward(module, calibrating, xb, config.calibration) if calibrating else module(xb)
        loss = task_loss(logits, yb)
        if config.lipschitz is None:
            return loss, {"loss": float(loss.detach())}
        penalty = config.lipschitz(_layer_weights(module))
        return loss + penalty, {"loss": float(loss.detach()), "penalty": float(penalty.detach())}

    rng = np.random.default_rng([config.seed, 0xB47])
    epochs = tqdm(range(1, config.epochs + 1), desc="fine-tune", unit="epoch", disable=not progress, leave=False)
    for epoch in epochs:
        module.train()
        means = run_epoch(step, optimizer, x_train, y_train, rng, batch_size=config.batch_size, device=device,
                          desc=f"epoch {epoch}", progress=progress)
        module.eval()
        log = validate(epoch, means["loss"], means.get("penalty"))
        history.append(log)
        epochs.set_postfix(clean=f"{log.clean_val:.4f}", varied="-" if log.varied_val is None else f"{log.varied_val:.4f}")
        if best_epoch is None or _better(log, history[best_epoch], floor):
            best_epoch, since_best = epoch, 0
            best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
        else:
            since_best += 1
            if since_best >= config.patience:
                break
    module.load_state_dict(best_state)
    return FinetuneResult(write_back(module, model), history, best_epoch, spectral_before,
                          SpectralReport.of(_layer_weights(module)))


def _better(candidate: EpochLog, incumbent: EpochLog, clean_floor: float) -> bool:
    """Whether ``candidate`` is the epoch to keep over ``incumbent`` (see the module docstring)."""
    def key(log: EpochLog) -> tuple:
        score = log.clean_val if log.varied_val is None else log.varied_val
        return (log.clean_val >= clean_floor, score)

    return key(candidate) > key(incumbent)
