"""Shared test helpers: onnxruntime runner, the quirk graphs, and the real models in ../shared."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

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
