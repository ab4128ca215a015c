"""Shared test helpers: onnxruntime runner, compensation feeds, and the real models in ../shared."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from rrcompile.compensation import candidates

sys.path.insert(0, str(Path(__file__).parent))  # for graph_builders

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DIGITS_MODEL = REPO / "models" / "digits_cnn.onnx"

# name -> (file, input batch shape at the model's own batch)
REAL_MODELS = {
    "mnist-8": ("mnist-8.onnx", (1, 1, 28, 28)),
    "lenet5_mnist": ("lenet5_mnist.onnx", (10, 1, 28, 28)),
    "cifar10_winml": ("cifar10_winml_imageclassifier.onnx", (4, 3, 32, 32)),
}


def run(model: onnx.ModelProto, x: np.ndarray, **extra: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x, **extra})[0]


def gates(model: onnx.ModelProto, value: float, layers: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """A feed setting the compensation gates of ``layers`` (default: every candidate) to ``value``."""
    return {c.gate: np.array(value, np.float32) for c in candidates(model) if layers is None or c.layer in layers}


def with_up_weights(model: onnx.ModelProto, seed: int = 0, scale: float = 0.5) -> onnx.ModelProto:
    """A copy of a compensated model whose zero-initialized up weights (and calibrated gains and
    offsets, around 1 and 0) are random, so candidates act."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    found = candidates(model)
    centres = {**{c.up: 0.0 for c in found}, **{c.gain: 1.0 for c in found if c.calibrated},
               **{c.offset: 0.0 for c in found if c.calibrated}}
    rng = np.random.default_rng(seed)
    for tensor in model.graph.initializer:
        if tensor.name in centres:
            value = centres[tensor.name] + rng.standard_normal(tuple(tensor.dims)) * scale
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), tensor.name))
    return model


def small_compensation_env():
    """The small selection problem the agent tests share: the digits CNN with a compensation
    candidate per layer (random up weights, so each acts), 200 images, 3 chips."""
    from rrcompile.data import load_data
    from rrcompile.devices import parse_device
    from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
    from rrcompile.pipeline import canonicalize
    from rrcompile.rl.environment import CompensationEnv

    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    compensated = with_up_weights(InsertCompensationCandidatesPass(budget=0.05)(model).model, seed=3)
    data = load_data("digits").subset(200)
    return CompensationEnv(compensated, parse_device("lognormal:sigma=0.5"), data.x / np.float32(255), data.y,
                           chips=3, seed=1, overhead_weight=0.5)


def small_calibration_env(budget: float = 0.05):
    """The digits CNN with a calibration slot per layer at the largest rank ``budget`` affords, 200
    images (the first 64 calibrate), 2 chips: a small rank-selection problem."""
    from rrcompile.data import load_data
    from rrcompile.devices import parse_device
    from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
    from rrcompile.pipeline import calibration_ranks, canonicalize
    from rrcompile.rl.environment import CalibrationEnv

    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    slotted = InsertCompensationCandidatesPass(ranks=calibration_ranks(model, budget), calibrated=True)(model).model
    data = load_data("digits").subset(200)
    x = data.x / np.float32(255)
    return CalibrationEnv(slotted, parse_device("lognormal:sigma=0.5"), x[:64], x, data.y, chips=2,
                          overhead_weight=0.1, max_overhead=budget)


def shared_path(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data not present ({path} missing): real-model tests need the shared data folder")
    return path


@pytest.fixture(params=sorted(REAL_MODELS))
def real_model(request) -> tuple[str, onnx.ModelProto, np.ndarray]:
    """(name, model, input at the model's own batch) for each real third-party model."""
    file, shape = REAL_MODELS[request.param]
    model = onnx.load(str(shared_path("models", file)))
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return request.param, model, x
