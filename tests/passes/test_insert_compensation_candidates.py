"""InsertCompensationCandidatesPass: invisible when inserted, switchable by gate, composes with variation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, gates, run, with_up_weights
from graph_builders import QUIRK_MODELS, make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.compensation import COMPENSATIONS, candidates, rank_for_budget
from rrcompile.devices import BY_OP_TYPE, noise_inputs, parse_device
from rrcompile.errors import PassError, UnsupportedModelError
from rrcompile.graph import RRCOMPILE_DOMAIN, analog_layers, model_io
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.pipeline import canonicalize

ALL_OFF = "lognormal:sigma=0+programming:eta=0+stuck:p_off=0,p_on=0+read:eta=0"
MODELS = [*sorted(QUIRK_MODELS), "digits_cnn"]


def load(name: str) -> tuple[onnx.ModelProto, np.ndarray]:
    """(canonical model, input) for a quirk graph or the shipped digits CNN."""
    if name == "digits_cnn":
        return canonicalize(onnx.load(str(DIGITS_MODEL))), np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    original, x = QUIRK_MODELS[name]()
    return canonicalize(original), x


def zero_noise(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {n.name: np.zeros(n.shape, np.float32) for n in noise_inputs(model)}


@pytest.mark.parametrize("name", MODELS)
def test_insertion_alone_keeps_outputs(name):
    model, x = load(name)
    compensated = InsertCompensationCandidatesPass()(model).model
    onnx.checker.check_model(compensated, full_check=True)
    layers = [layer.node for layer in analog_layers(model)]
    assert [c.layer for c in candidates(compensated)] == layers
    assert [o.name for o in compensated.graph.output] == [o.name for o in model.graph.output]
    assert model_io(compensated) == model_io(model)  # gates are initializer-backed, not data
    np.testing.assert_allclose(run(compensated, x), run(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_gates_switch_candidates_off(name):
    model, x = load(name)
    compensated = with_up_weights(InsertCompensationCandidatesPass()(model).model)
    assert np.abs(run(compensated, x) - run(model, x)).max() > 1e-3
    np.testing.assert_allclose(run(compensated, x, **gates(compensated, 0.0)), run(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("variation_first", [True, False], ids=["varied_then_compensated", "compensated_then_varied"])
def test_composes_with_variation_in_either_order(name, variation_first):
    model, x = load(name)
    device = parse_device(ALL_OFF)
    if variation_first:
        both = InsertCompensationCandidatesPass()(InsertVariationPass(device)(model).model).model
    else:
        both = InsertVariationPass(device)(InsertCompensationCandidatesPass()(model).model).model
    onnx.checker.check_model(both, full_check=True)
    assert [(o.domain, o.version) for o in both.opset_import].count((RRCOMPILE_DOMAIN, 1)) == 1
    assert len({f.name for f in both.functions}) == len(both.functions)
    np.testing.assert_allclose(run(both, x, **zero_noise(both)), run(model, x), atol=1e-5, rtol=0)

    by_name = {n.name: n for n in both.graph.node}
    varied = {out for n in both.graph.node if n.op_type in BY_OP_TYPE for out in n.output}
    for candidate in candidates(both):
        node = by_name[candidate.node]
        assert node.input[1] == by_name[candidate.layer].input[0]  # the layer's data input...
        assert varied.isdisjoint(node.input)  # ...and never a varied weight


def test_conv_auto_pad_becomes_explicit_pads():
    # SAME_LOWER with an even kernel and stride 2 pads asymmetrically; with Wd = W and Wu = I the
    # candidate recomputes the layer, so the output doubles only if the geometry matches exactly
    weight = np.random.default_rng(3).standard_normal((3, 2, 4, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv", auto_pad="SAME_LOWER", strides=[2, 2])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 9, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(weight, "W")])
    model = canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    compensated = InsertCompensationCandidatesPass(rank=3)(model).model
    node = next(n for n in compensated.graph.node if n.op_type == "ConvCompensation")
    assert {a.name: list(a.ints) for a in node.attribute} == {"strides": [2, 2], "pads": [2, 2, 1, 1], "dilations": [1, 1]}
    for tensor in compensated.graph.initializer:
        if tensor.name == "conv.compensation_down":
            tensor.CopyFrom(numpy_helper.from_array(weight, tensor.name))
        elif tensor.name == "conv.compensation_up":
            tensor.CopyFrom(numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), tensor.name))
    x = np.random.default_rng(4).standard_normal((2, 2, 9, 7)).astype(np.float32)
    np.testing.assert_allclose(run(compensated, x), 2 * run(model, x), atol=1e-4, rtol=1e-5)


def test_layer_with_unknown_shape_under_auto_pad_is_skipped_with_a_reason():
    inits = [numpy_helper.from_array(np.ones((2, 1, 3, 3), np.float32), "W"), numpy_helper.from_array(np.ones((2, 4), np.float32), "V")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["c"], name="conv", auto_pad="SAME_UPPER"),
         helper.make_node("ReduceMean", ["c"], ["r"], name="pool", axes=[2, 3], keepdims=0),
         helper.make_node("MatMul", ["r", "V"], ["y"], name="fc")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.warns(UserWarning, match="'conv' gets no compensation candidate: auto_pad=SAME_UPPER needs the input's spatial shape"):
        compensated = InsertCompensationCandidatesPass()(model).model
    assert [c.layer for c in candidates(compensated)] == ["fc"]


def test_weights_gate_and_rank():
    model, _ = load("digits_cnn")
    compensated = InsertCompensationCandidatesPass(budget=0.1, seed=3)(model).model
    inits = {t.name: numpy_helper.to_array(t) for t in compensated.graph.initializer}
    layers = analog_layers(model)
    for layer, candidate in zip(layers, candidates(compensated)):
        assert candidate.rank == rank_for_budget(layer, 0.1)
        assert candidate.rank == 1 or candidate.weights <= 0.1 * layer.params
        assert inits[candidate.up].any() == False  # noqa: E712 - zeros: insertion alone changes nothing
        assert inits[candidate.down].std() > 0
        assert inits[candidate.gate].shape == () and inits[candidate.gate] == 1.0
    assert {c.gate for c in candidates(compensated)} <= {i.name for i in compensated.graph.input}
    again = InsertCompensationCandidatesPass(budget=0.1, seed=3)(model).model
    assert again.SerializeToString() == compensated.SerializeToString()  # seeded
    fixed = InsertCompensationCandidatesPass(rank=2)(model).model
    assert {c.rank for c in candidates(fixed)} == {2}
    assert sorted(f.name for f in fixed.functions) == ["ConvCompensation", "DenseCompensation"]


def test_rejects_a_compensated_model_and_a_model_without_analog_layer():
    model, _ = load("mlp_matmul_chain")
    compensated = InsertCompensationCandidatesPass()(model).model
    with pytest.raises(PassError, match="already contains compensation candidates"):
        InsertCompensationCandidatesPass()(compensated)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    with pytest.raises(UnsupportedModelError, match="no analog layer"):
        InsertCompensationCandidatesPass()(canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    with pytest.raises(PassError, match="run CanonicalizePass first"):
        InsertCompensationCandidatesPass()(QUIRK_MODELS["mlp_matmul_chain"]()[0])


@pytest.mark.shared
def test_real_models_keep_outputs_after_insertion(real_model):
    name, original, x = real_model
    compensated = InsertCompensationCandidatesPass()(canonicalize(original)).model
    assert len(candidates(compensated)) == len(analog_layers(compensated))
    np.testing.assert_allclose(run(compensated, x), run(original, x), atol=1e-5, rtol=0)
