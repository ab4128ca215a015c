"""What the model-training scripts share: the ONNX wrapper around their nodes, and the checked write.

Each script trains in torch, builds its nodes with ``onnx.helper`` (stable names, byte-identical
files for the same seed), and writes the file only once onnxruntime agrees with torch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from rrcompile.io import atomic_write


def classifier_model(name: str, nodes, initializers, input_shape: list, producer: str, doc: str) -> onnx.ModelProto:
    """An opset-17 classifier from ``image`` [N, *input_shape] to ``logits`` [N, 10]."""
    graph = helper.make_graph(
        nodes, name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", *input_shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name=producer, doc_string=doc)
    model.ir_version = 9  # pinned: the onnx default tracks the installed version and may outrun onnxruntime
    return model


def write_checked(model: onnx.ModelProto, torch_logits: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  dataset: str, output: Path) -> float:
    """Write ``model`` (with its test accuracy in the metadata) if onnxruntime matches torch within 1e-4."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    logits = np.concatenate([session.run(["logits"], {"image": x_test[i:i + 1000]})[0]
                             for i in range(0, len(x_test), 1000)])
    if not np.allclose(logits, torch_logits, rtol=0, atol=1e-4):
        raise SystemExit(f"onnxruntime differs from torch by {np.abs(logits - torch_logits).max()}; nothing written")
    accuracy = float((logits.argmax(1) == y_test).mean())
    helper.set_model_props(model, {"dataset": dataset, "preprocess": "scale=255 mean=0 std=1",
                                   "test_accuracy": f"{accuracy:.4f}"})
    onnx.checker.check_model(model, full_check=True)
    with atomic_write(output) as tmp:
        tmp.write_bytes(model.SerializeToString())
    return accuracy
