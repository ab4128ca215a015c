"""Compensation functions against their numpy references, rank budgets, and candidate costs."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from graph_builders import QUIRK_MODELS, make_model
from onnx import TensorProto, helper

from rrcompile.compensation import (
    ConvCompensation, DenseCompensation, calibration_kind, candidates, rank_for_budget, weights_per_rank,
)
from rrcompile.devices import FUNCTION_OPSET
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, analog_layers
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize

RNG = np.random.default_rng(7)


def run_function(kind, arrays: dict[str, np.ndarray], **attrs) -> np.ndarray:
    """Run one call of ``kind``'s function through onnxruntime, every operand a graph input."""
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, value.shape) for name, value in arrays.items()]
    node = helper.make_node(kind.op_type, list(arrays), ["Z"], domain=RRCOMPILE_DOMAIN, **attrs)
    graph = helper.make_graph([node], "op", inputs, [helper.make_tensor_value_info("Z", TensorProto.FLOAT, arrays["Y"].shape)])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET),
                                             helper.make_opsetid(RRCOMPILE_DOMAIN, FUNCTION_OPSET)],
                       functions=[kind.function_proto()])
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, arrays)[0]


def normal(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("strides,pads,dilations", [([1, 1], [0, 0, 0, 0], [1, 1]), ([2, 1], [1, 0, 2, 1], [1, 2])])
def test_conv_compensation_matches_numpy_reference(strides, pads, dilations):
    x, wd, wu = normal(2, 3, 9, 8), normal(4, 3, 3, 2), normal(5, 4, 1, 1)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations}
    out = [(n + pads[i] + pads[i + 2] - dilations[i] * (k - 1) - 1) // strides[i] + 1 for i, (n, k) in enumerate([(9, 3), (8, 2)])]
    y = normal(2, 5, *out)
    got = run_function(ConvCompensation, {"Y": y, "X": x, "Wd": wd, "Wu": wu, "G": np.array(0.7, np.float32)}, **attrs)
    assert got.shape == y.shape
    np.testing.assert_allclose(got, ConvCompensation.apply(y, x, wd, wu, 0.7, **attrs), atol=1e-4, rtol=1e-5)


def test_dense_compensation_matches_numpy_reference():
    x, wd, wu, y = normal(4, 3, 12), normal(12, 2), normal(2, 5), normal(4, 3, 5)  # MatMul broadcasts leading dims
    got = run_function(DenseCompensation, {"Y": y, "X": x, "Wd": wd, "Wu": wu, "G": np.array(1.5, np.float32)})
    np.testing.assert_allclose(got, DenseCompensation.apply(y, x, wd, wu, 1.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [0, 3])
def test_calibration_functions_match_their_numpy_references(rank):
    conv, dense = calibration_kind("Conv", rank), calibration_kind("Gemm", rank)
    assert (conv.branchless, dense.branchless) == (rank == 0, rank == 0)
    attrs = {"strides": [1, 2], "pads": [1, 0, 1, 1], "dilations": [1, 1]}
    x = normal(2, 3, 7, 8)
    y = normal(2, 5, 7, 4)
    gain, offset = normal(5, 1, 1), normal(5, 1, 1)
    operands = {"Y": y, "X": x, "Wd": normal(rank, 3, 3, 2), "Wu": normal(5, rank, 1, 1), "G": np.array(1, np.float32),
                "A": gain, "B": offset}
    got = run_function(conv, operands, **attrs)
    np.testing.assert_allclose(got, conv.apply(*operands.values(), **attrs), atol=1e-4, rtol=1e-5)
    # a rank-0 slot computes no convolution at all: onnxruntime 1.30's NCHWc pass fails on one to 0 channels
    assert rank or not any(n.op_type == "Conv" for n in conv.function_proto().node)
    x, y = normal(4, 12), normal(4, 6)
    operands = {"Y": y, "X": x, "Wd": normal(12, rank), "Wu": normal(rank, 6), "G": np.array(1, np.float32),
                "A": normal(6), "B": normal(6)}
    np.testing.assert_allclose(run_function(dense, operands), dense.apply(*operands.values()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_calibration_slots_start_as_the_identity_and_count_their_columns(name):
    raw, x = QUIRK_MODELS[name]()
    model = canonicalize(raw)
    slotted = InsertCompensationCandidatesPass(rank=1, calibrated=True)(model).model
    layers = {layer.node: layer for layer in analog_layers(model)}
    found = candidates(slotted)
    assert found and all(c.calibrated for c in found)
    for candidate in found:
        layer = layers[candidate.layer]
        assert candidate.weights == layer.rows + layer.cols + 2 * layer.cols
    sessions = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]) for m in (slotted, model)]
    outputs = [s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions]
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-6, rtol=1e-6)


def test_gate_zero_returns_the_analog_output_exactly():
    y, x = normal(3, 6), normal(3, 4)
    got = run_function(DenseCompensation, {"Y": y, "X": x, "Wd": normal(4, 2), "Wu": normal(2, 6), "G": np.array(0, np.float32)})
    np.testing.assert_array_equal(got, y)


@pytest.mark.parametrize("budget", [0.0, 0.01, 0.05, 0.2, 1.0, 10.0])
def test_rank_for_budget_is_the_largest_rank_within_budget(budget):
    conv = AnalogLayer("conv", "Conv", "W", None, (120, 16, 5, 5), rows=400, cols=120)
    dense = AnalogLayer("fc", "Gemm", "W", None, (84, 120), rows=120, cols=84)
    for layer in (conv, dense):
        rank = rank_for_budget(layer, budget)
        cap = min(layer.rows, layer.cols)
        assert 1 <= rank <= cap
        if rank > 1:
            assert rank * weights_per_rank(layer) <= budget * layer.params
        if rank < cap:
            assert (rank + 1) * weights_per_rank(layer) > budget * layer.params
    assert rank_for_budget(conv, 0.05) == 4  # 0.05 * 48000 = 2400 weights, 520 per rank
    assert rank_for_budget(dense, 10.0) == 84  # capped at min(rows, cols)


def test_candidate_costs_match_hand_computation():
    # conv: W [5, 2, 3, 3] on 8x8 without padding -> 6x6; fc: Gemm [180 -> 7]
    model = canonicalize(QUIRK_MODELS["batchnorm_logsoftmax"]()[0])
    compensated = InsertCompensationCandidatesPass(rank=2)(model).model
    conv, fc = candidates(compensated)
    assert (conv.layer, conv.node, conv.op, conv.rank) == ("conv", "conv.compensation", "ConvCompensation", 2)
    assert conv.weights == 2 * 2 * 3 * 3 + 5 * 2  # Wd [2, 2, 3, 3] + Wu [5, 2, 1, 1]
    assert conv.macs == 2 * 2 * 3 * 3 * 6 * 6 + 5 * 2 * 6 * 6
    assert (fc.layer, fc.op, fc.rank, fc.weights, fc.macs) == ("fc", "DenseCompensation", 2, 2 * (180 + 7), 2 * (180 + 7))
    assert (conv.down, conv.up, conv.gate) == ("conv.compensation_down", "conv.compensation_up", "conv.compensation_gate")
    assert [layer.node for layer in analog_layers(compensated)] == ["conv", "fc"]
