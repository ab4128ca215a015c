"""Calibration slots folded into their layers compute what the slotted graph computes."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_MODEL, run
from graph_builders import batchnorm_logsoftmax, cntk_conv_add_matmul, mlp_matmul_chain, torch_fixed_batch_softmax

from rrcompile.calibrate import CalibratedEvaluator
from rrcompile.compensation import candidates
from rrcompile.crossbar import with_adc_ranges
from rrcompile.data import Preprocess, load_data
from rrcompile.devices import parse_device
from rrcompile.graph import analog_layers, keep_where, with_initializers
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.slot_folding import FoldedSlots


def slotted_with_chip_parameters(model: onnx.ModelProto, seed: int = 0) -> onnx.ModelProto:
    """``model`` with a calibration slot per analog layer, ranks 0 and 2 in turn, holding random
    per-chip parameters (what a calibration writes)."""
    ranks = {layer.node: 2 * (i % 2) for i, layer in enumerate(analog_layers(model))}
    slotted = InsertCompensationCandidatesPass(ranks=ranks, calibrated=True)(model).model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in slotted.graph.initializer}
    rng = np.random.default_rng(seed)
    values = {}
    for c in candidates(slotted):
        for name, centre in ((c.down, 0.0), (c.up, 0.0), (c.gain, 1.0), (c.offset, 0.0)):
            values[name] = (centre + 0.3 * rng.standard_normal(inits[name].shape)).astype(np.float32)
    return with_initializers(slotted, values)


def every_output(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})


# builder -> the layers whose slots fold: plain Conv and Gemm layers (mlp's bias-less MatMul and
# batchnorm's Gemm with alpha 0.5 keep their slots)
@pytest.mark.parametrize("builder, folded", [
    (torch_fixed_batch_softmax, 3), (cntk_conv_add_matmul, 2), (batchnorm_logsoftmax, 1), (mlp_matmul_chain, 2),
])
def test_folded_slots_compute_the_slotted_model(builder, folded):
    model, x = builder()
    slotted = slotted_with_chip_parameters(canonicalize(model))
    folding = FoldedSlots(slotted)
    assert len(folding.folds) == folded
    folded_model = with_initializers(folding.model, folding.values({}))
    onnx.checker.check_model(folded_model, full_check=True)
    assert len(candidates(folded_model)) == len(candidates(slotted)) - folded
    expected = run(slotted, x)
    np.testing.assert_allclose(run(folded_model, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_folded_values_follow_the_weights_and_parameters_they_are_given():
    model, x = torch_fixed_batch_softmax()
    slotted = slotted_with_chip_parameters(canonicalize(model))
    folding = FoldedSlots(slotted)
    layer = folding.folds[0]
    other = slotted_with_chip_parameters(canonicalize(model), seed=1)
    parameters = {t.name: onnx.numpy_helper.to_array(t) for t in other.graph.initializer
                  if t.name in folding.absorbed}
    weight = onnx.numpy_helper.to_array(next(t for t in slotted.graph.initializer if t.name == layer.weight)) * 1.5
    folded = with_initializers(folding.model, folding.values({layer.weight: weight}, parameters))
    expected = run(with_initializers(other, {layer.weight: weight}), x)
    np.testing.assert_allclose(run(folded, x), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("spec", ["lognormal:sigma=0.5", "tile:size=16+adc:bits=8+lognormal:sigma=0.5"])
def test_a_calibrated_chip_runs_folded_as_its_slotted_graph(spec):
    """The evaluator's chip (folded, where the layer is read directly) against the varied graph
    itself with the chip's noise and calibration: tiled layers keep their slots."""
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    data = load_data("digits", "test").subset(64)
    x = Preprocess.parse("255", "0", "1").apply(data.x)
    slotted = InsertCompensationCandidatesPass(ranks={"conv1": 2, "conv2": 0, "fc1": 2, "fc2": 1},
                                               calibrated=True)(model).model
    device = with_adc_ranges(slotted, parse_device(spec), x)
    calibrated = CalibratedEvaluator(slotted, device, x[:32])
    evaluator, values = calibrated.evaluator, calibrated.calibrate(seed=0, chip=3).values
    folds = evaluator.folded.folds if evaluator.folded is not None else []
    assert len(folds) == (4 if spec.startswith("lognormal") else 0)
    session, feed = evaluator.chip(0, 3, values)
    got = session.run(None, {evaluator.input_name: evaluator.prepare(x), **feed()})[0]
    expected = run(with_initializers(evaluator.varied_model, values), evaluator.prepare(x), **evaluator.chip_feed(0, 3))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_a_layer_whose_bias_another_node_reads_keeps_its_slot():
    model, x = torch_fixed_batch_softmax()
    slotted = slotted_with_chip_parameters(canonicalize(model))
    conv = next(n for n in slotted.graph.node if n.op_type == "Conv")
    slotted.graph.node.append(onnx.helper.make_node("Identity", [conv.input[2]], ["bias_copy"], name="reads_the_bias"))
    slotted.graph.output.append(onnx.helper.make_tensor_value_info("bias_copy", onnx.TensorProto.FLOAT, None))
    folding = FoldedSlots(slotted)
    assert conv.name not in {f.layer for f in folding.folds} and len(folding.folds) == 2
    folded = with_initializers(folding.model, folding.values({}))
    for got, expected in zip(every_output(folded, x), every_output(slotted, x)):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_a_slot_whose_gate_is_fed_at_run_time_stays():
    model, x = torch_fixed_batch_softmax()
    slotted = slotted_with_chip_parameters(canonicalize(model))
    gate = candidates(slotted)[0].gate
    keep_where(slotted.graph.initializer, lambda t: t.name != gate)
    folding = FoldedSlots(slotted)
    assert candidates(slotted)[0].layer not in {f.layer for f in folding.folds} and len(folding.folds) == 2
    fed = {gate: np.array(0.5, np.float32)}
    np.testing.assert_allclose(run(with_initializers(folding.model, folding.values({})), x, **fed), run(slotted, x, **fed),
                               rtol=1e-5, atol=1e-5)
