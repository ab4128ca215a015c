"""InsertVariationPass: exact at sigma = 0, statistically right with variation on, one chip per feed."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import run
from graph_builders import QUIRK_MODELS, make_model

from rrcompile.devices import noise_inputs, parse_device
from rrcompile.errors import UnsupportedModelError
from rrcompile.graph import RRCOMPILE_DOMAIN, analog_layers
from rrcompile.pipeline import canonicalize
from rrcompile.passes.insert_variation import InsertVariationPass

ALL_OFF = "lognormal:sigma=0+programming:eta=0+stuck:p_off=0,p_on=0+read:eta=0"


def feed_chip(model: onnx.ModelProto, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(model)}


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_all_variation_off_keeps_outputs(name):
    original, x = QUIRK_MODELS[name]()
    model = canonicalize(original)
    varied = InsertVariationPass(parse_device(ALL_OFF))(model).model
    onnx.checker.check_model(varied, full_check=True)
    assert len(noise_inputs(varied)) == 4 * len(analog_layers(model))
    np.testing.assert_allclose(run(varied, x, **feed_chip(varied, 0)), run(original, x), atol=1e-5, rtol=0)


def test_variation_ops_are_model_local_functions_in_their_domain():
    model = canonicalize(QUIRK_MODELS["mlp_matmul_chain"]()[0])
    varied = InsertVariationPass(parse_device("quantize:levels=9+lognormal:sigma=0.3+stuck:p_off=0.1,p_on=0"))(model).model
    assert ("ai.rrcompile", 1) in [(o.domain, o.version) for o in varied.opset_import]
    assert sorted(f.name for f in varied.functions) == ["LogNormalVariation", "Quantize", "StuckAtFault"]
    assert all(f.domain == RRCOMPILE_DOMAIN for f in varied.functions)
    ops = [n.op_type for n in varied.graph.node if n.domain == RRCOMPILE_DOMAIN]
    assert ops[:3] == ["Quantize", "LogNormalVariation", "StuckAtFault"]  # physical order, whatever the spec order


def test_lognormal_sigma_changes_outputs_and_same_chip_same_outputs():
    original, x = QUIRK_MODELS["torch_fixed_batch_softmax"]()
    varied = InsertVariationPass(parse_device("lognormal:sigma=0.5"))(canonicalize(original)).model
    chip_a, chip_b = feed_chip(varied, 1), feed_chip(varied, 2)
    assert np.abs(run(varied, x, **chip_a) - run(original, x)).max() > 1e-3
    np.testing.assert_array_equal(run(varied, x, **chip_a), run(varied, x, **chip_a))
    assert np.abs(run(varied, x, **chip_a) - run(varied, x, **chip_b)).max() > 1e-3


def test_per_layer_device_override_leaves_digital_layer_exact():
    model = canonicalize(QUIRK_MODELS["mlp_matmul_chain"]()[0])
    device = parse_device("lognormal:sigma=0.5")
    device.layers["dense2"] = []
    varied = InsertVariationPass(device)(model).model
    assert {n.name.split(".")[0] for n in noise_inputs(varied)} == {"dense1", "dense3"}


def test_model_without_analog_layer_is_rejected():
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    model = canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(UnsupportedModelError, match="no analog layer"):
        InsertVariationPass(parse_device("lognormal:sigma=0.5"))(model)


@pytest.mark.shared
def test_real_models_keep_outputs_with_all_variation_off(real_model):
    name, original, x = real_model
    varied = InsertVariationPass(parse_device(ALL_OFF))(canonicalize(original)).model
    # rtol: a weight computed at run time rules out onnxruntime's constant-weight optimizations
    # (prepacking), whose kernels round differently (cifar10_winml's logits near 20 differ by ~1e-5)
    np.testing.assert_allclose(run(varied, x, **feed_chip(varied, 0)), run(original, x), atol=1e-5, rtol=1e-6)
