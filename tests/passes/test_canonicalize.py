"""CanonicalizePass: output-equivalent on every quirk graph and real model; the canonical form holds."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run
from graph_builders import QUIRK_MODELS

from rrcompile.graph import TARGET_OPSET, analog_layers, default_opset
from rrcompile.passes.canonicalize import CanonicalizePass

TOLERANCE = 1e-5


def assert_canonical(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    assert default_opset(model) == TARGET_OPSET
    names = [n.name for n in model.graph.node]
    assert "" not in names and len(set(names)) == len(names)
    ops = [n.op_type for n in model.graph.node]
    assert "BatchNormalization" not in ops and "Constant" not in ops
    for node in model.graph.node:  # no Add left reading a Conv/Gemm output: biases are fused
        if node.op_type == "Add":
            producers = [p.op_type for p in model.graph.node if set(p.output) & set(node.input)]
            assert not set(producers) & {"Conv", "Gemm", "MatMul"}
    assert {i.name for i in model.graph.input}.isdisjoint(t.name for t in model.graph.initializer)
    dim0 = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim0.dim_param, "batch dimension must be symbolic"


def assert_equivalent_any_batch(original: onnx.ModelProto, canonical: onnx.ModelProto, x: np.ndarray) -> None:
    expected = run(original, x)
    np.testing.assert_allclose(run(canonical, x), expected, atol=TOLERANCE, rtol=0)
    # the symbolic batch really works: a batch of another size gives the same per-sample outputs
    bigger = np.concatenate([x, x[:1], x])
    out = run(canonical, bigger)
    np.testing.assert_allclose(out[: len(x)], expected, atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(out[len(x)], expected[0], atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_quirk_graph_is_canonicalized_without_changing_outputs(name):
    original, x = QUIRK_MODELS[name]()
    result = CanonicalizePass()(original)
    assert result.modified
    assert_canonical(result.model)
    assert_equivalent_any_batch(original, result.model, x)


def test_cntk_quirks_become_conv_with_bias_and_gemm():
    original, _ = QUIRK_MODELS["cntk_conv_add_matmul"]()
    model = CanonicalizePass()(original).model
    layers = {layer.node: layer for layer in analog_layers(model)}
    assert layers["conv"].op == "Conv" and layers["conv"].bias is not None
    assert layers["fc"].op == "Gemm" and layers["fc"].weight_shape == (64, 5)  # weight reshape was folded
    assert [n.op_type for n in model.graph.node] == ["Conv", "Relu", "MaxPool", "Reshape", "Gemm"]


def test_batchnorm_folds_into_conv_and_gemm_and_dead_branch_is_gone():
    original, _ = QUIRK_MODELS["batchnorm_logsoftmax"]()
    model = CanonicalizePass()(original).model
    assert [n.name for n in model.graph.node] == ["conv", "relu1", "flatten", "fc", "head"]


def test_canonicalize_is_idempotent():
    original, _ = QUIRK_MODELS["torch_fixed_batch_softmax"]()
    once = CanonicalizePass()(original).model
    again = CanonicalizePass()(once)
    assert not again.modified


@pytest.mark.shared
def test_real_models_are_canonicalized_without_changing_outputs(real_model):
    name, original, x = real_model
    model = CanonicalizePass()(original).model
    assert_canonical(model)
    assert_equivalent_any_batch(original, model, x * 255)
    assert len(analog_layers(model)) >= 3, name
