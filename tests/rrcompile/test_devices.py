"""Device models: spec parsing, ONNX functions vs their numpy reference, and seeded statistics."""
from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, run
from graph_builders import make_model
from onnx import TensorProto, helper

from rrcompile.devices import DEVICE_MODELS, LogNormalVariation, parse_device, parse_models, simulated_device
from rrcompile.errors import DeviceSpecError
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, analog_layers
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.pipeline import canonicalize

SPECS = {
    "lognormal": "lognormal:sigma=0.4",
    "programming": "programming:eta=0.05",
    "read": "read:eta=0.03",
    "quantize": "quantize:levels=7",
    "stuck": "stuck:p_off=0.2,p_on=0.1",
}


def single_op_model(model, shape) -> onnx.ModelProto:
    """A graph computing ``model`` on the weight input W (range R = max|W| computed in-graph)."""
    noise_shape = model.noise_shape(tuple(shape))
    inputs = ["W", "R"] if model.reads_range() else ["W"]
    if model.noise is not None:
        inputs.append("noise")
    nodes = [helper.make_node("Abs", ["W"], ["A"]), helper.make_node("ReduceMax", ["A"], ["R"], keepdims=0),
             helper.make_node(model.op_type, inputs, ["Y"], domain=RRCOMPILE_DOMAIN, **model.values)]
    graph_inputs = [helper.make_tensor_value_info("W", TensorProto.FLOAT, shape)]
    if model.noise is not None:
        graph_inputs.append(helper.make_tensor_value_info("noise", TensorProto.FLOAT, noise_shape))
    graph = helper.make_graph(nodes, "op", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)])
    return make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET), helper.make_opsetid(RRCOMPILE_DOMAIN, 1)],
                      functions=[type(model).function_proto()])


# variants of a kind, each its own ONNX function
VARIANT_SPECS = {"lognormal differential": "lognormal:sigma=0.4,mapping=differential"}


@pytest.mark.parametrize("kind", [*sorted(SPECS), *VARIANT_SPECS])
def test_onnx_function_matches_numpy_reference(kind):
    (model,) = parse_models({**SPECS, **VARIANT_SPECS}[kind])
    rng = np.random.default_rng(7)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    noise = model.noise.draw(rng, model.noise_shape(w.shape)) if model.noise else None
    onnx_model = single_op_model(model, w.shape)
    onnx.checker.check_model(onnx_model, full_check=True)
    feeds = {"noise": noise} if noise is not None else {}
    got = run(onnx_model, w, **feeds)
    expected = model.apply(w, float(np.abs(w).max()), noise)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert np.abs(got - w).max() > 1e-3  # the effect is really there


def test_lognormal_log_ratio_has_mean_zero_and_std_sigma():
    sigma = 0.5
    model = LogNormalVariation(sigma=sigma)
    rng = np.random.default_rng(0)
    w = (rng.random((200, 250)) + 0.1).astype(np.float32) * np.where(rng.random((200, 250)) < 0.5, -1, 1).astype(np.float32)
    varied = run(single_op_model(model, w.shape), w, noise=model.noise.draw(rng, w.shape))
    log_ratio = np.log(varied / w)
    n = log_ratio.size
    # 5-sigma bounds of the sample mean (std sigma/sqrt n) and sample std (std ~ sigma/sqrt(2n))
    assert abs(log_ratio.mean()) < 5 * sigma / np.sqrt(n)
    assert abs(log_ratio.std() - sigma) < 5 * sigma / np.sqrt(2 * n)


def test_differential_pair_statistics():
    """Each cell of the pair varies on its own: E[Y] = W exp(sigma^2 / 2), and a zero weight keeps an
    error of std g0 R sqrt(2 (exp(2 sigma^2) - exp(sigma^2)))."""
    sigma, g0 = 0.5, 0.1
    (model,) = parse_models(f"lognormal:sigma={sigma},mapping=differential,g0={g0}")
    assert model.spec() == "lognormal:sigma=0.5,mapping=differential,g0=0.1" and parse_models(model.spec()) == [model]
    rng = np.random.default_rng(1)
    w = np.zeros((400, 500), np.float32)
    w[:200] = 1.0  # R = 1; half the weights at the range, half at zero
    y = run(single_op_model(model, w.shape), w, noise=model.noise.draw(rng, model.noise_shape(w.shape)))
    var_cell = np.exp(2 * sigma ** 2) - np.exp(sigma ** 2)
    n = y[200:].size
    assert abs(y[200:].mean()) < 5 * g0 * np.sqrt(2 * var_cell / n)
    assert y[200:].std() == pytest.approx(g0 * np.sqrt(2 * var_cell), rel=0.02)
    expected_mean = np.exp(sigma ** 2 / 2)  # (1 + g0) e^{s^2/2} - g0 e^{s^2/2}
    assert abs(y[:200].mean() - expected_mean) < 5 * np.sqrt(((1 + g0) ** 2 + g0 ** 2) * var_cell / n)
    assert parse_models(f"lognormal:sigma={sigma},mapping=differential")[0].values["g0"] == 0.1  # the stated default


def test_stuck_at_fractions_and_quantize_levels():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((300, 300)).astype(np.float32)
    (stuck,) = parse_models("stuck:p_off=0.05,p_on=0.02")
    y = run(single_op_model(stuck, w.shape), w, noise=stuck.noise.draw(rng, w.shape))
    r = np.abs(w).max()
    n = w.size
    assert abs(np.mean(y == 0) - 0.05) < 5 * np.sqrt(0.05 * 0.95 / n)
    assert abs(np.mean(np.isclose(np.abs(y), r)) - 0.02) < 5 * np.sqrt(0.02 * 0.98 / n)
    (quant,) = parse_models("quantize:levels=16")
    q = run(single_op_model(quant, w.shape), w)
    assert len(np.unique(q)) <= 16 and np.abs(q - w).max() <= r / 15 + 1e-6


def test_spec_parsing_orders_physically_and_rejects_bad_input():
    models = parse_models("read:eta=0.01+lognormal:sigma=0.5+quantize:levels=8")
    assert [m.kind for m in models] == ["quantize", "lognormal", "read"]
    for bad, match in [("lognormal:sigma=-0.1", "sigma=-0.1 must be >= 0"), ("gaussian:sigma=1", "unknown device model 'gaussian'"),
                       ("lognormal:mu=1", "bad parameter 'mu=1'"), ("lognormal:sigma=x", "not a number"),
                       ("lognormal", "missing sigma"), ("quantize:levels=2.5", "integer"),
                       ("stuck:p_off=0.7,p_on=0.6", "p_off \\+ p_on"), ("lognormal:sigma=inf", "sigma=inf must be a finite"),
                       ("read:eta=nan", "eta=nan must be a finite"), ("quantize:levels=inf", "levels=inf must be an integer"),
                       ("adc:bits=0", "bits=0 must be an integer in \\[2, 24\\]"), ("tile:size=0", "size=0 must be an integer"),
                       ("adc:bits=8,range=-1", "range=-1 must be a percentile in \\(0, 100\\]"),
                       ("lognormal:sigma=0.5,mapping=pcm", "unknown mapping 'pcm'"), ("adc:range=50", "missing bits"),
                       ("lognormal:sigma=0.5,g0=0.1", "g0 is the reference conductance of mapping=differential"),
                       ("tile:rows=3", "bad parameter 'rows=3'"), ("adc:bits=8,noise=-0.1", "noise=-0.1 must be >= 0")]:
        with pytest.raises(DeviceSpecError, match=match):
            parse_models(bad)
    assert set(DEVICE_MODELS) == set(SPECS)


def test_device_file_sets_models_per_layer(tmp_path):
    path = tmp_path / "chip.json"
    path.write_text(json.dumps({"default": "lognormal:sigma=0.5",
                                "layers": {"fc*": {"lognormal": {"sigma": 0.1}, "quantize": {"levels": 16}}, "conv1": "none"}}))
    device = parse_device(str(path))
    assert device.for_layer("conv2", "conv2.weight") == parse_models("lognormal:sigma=0.5")
    assert [m.kind for m in device.for_layer("fc1", "fc1.weight")] == ["quantize", "lognormal"]
    assert device.for_layer("conv1", "w") == []
    yaml_path = tmp_path / "chip.yaml"
    yaml_path.write_text("default:\n  - lognormal:sigma=0.3\n  - read:eta=0.01\n")
    assert [m.kind for m in parse_device(str(yaml_path)).default] == ["lognormal", "read"]
    bad = tmp_path / "bad.json"
    bad.write_text('{"default": "lognormal:sigma=-1"}')
    with pytest.raises(DeviceSpecError, match="bad.json"):
        parse_device(str(bad))
    with pytest.raises(DeviceSpecError, match="not found"):
        parse_device(str(tmp_path / "missing.yaml"))


def test_a_layer_pattern_that_matches_no_analog_layer_is_refused(tmp_path):
    layers = analog_layers(canonicalize(onnx.load(str(DIGITS_MODEL))))
    path = tmp_path / "chip.json"
    path.write_text(json.dumps({"layers": {"fc*": "none", "conv2.weight": "lognormal:sigma=0.1"}}))
    parse_device(str(path)).check_patterns(layers)  # by node name and by weight name
    for pattern in ("Conv_*", "conv[1"):  # another export's names; an unclosed class matches literally
        path.write_text(json.dumps({"layers": {"fc*": "none", pattern: "none"}}))
        with pytest.raises(DeviceSpecError, match=re.escape(f"chip.json: layer pattern '{pattern}' matches no analog layer")):
            parse_device(str(path)).check_patterns(layers)


def test_with_sigma_replaces_every_lognormal():
    device = parse_device("lognormal:sigma=0.5+read:eta=0.01")
    assert [m.spec() for m in device.with_sigma(0.2).default] == ["lognormal:sigma=0.2", "read:eta=0.01"]
    with pytest.raises(DeviceSpecError, match="needs a 'lognormal'"):
        parse_device("read:eta=0.01").with_sigma(0.2)


def test_crossbar_terms_compose_with_weight_effects():
    stack = parse_models("adc:bits=8,noise=0.01+lognormal:sigma=0.5,mapping=differential+tile:size=64")
    assert [m.spec() for m in stack] == ["lognormal:sigma=0.5,mapping=differential,g0=0.1", "tile:size=64,cols=64",
                                         "adc:bits=8,noise=0.01"]
    device = parse_device("tile+adc:bits=6+lognormal:sigma=0.5,mapping=differential")
    assert [m.spec() for m in device.with_sigma(0.2).default][0] == "lognormal:sigma=0.2,mapping=differential,g0=0.1"
    assert device.crossbar and not parse_device("lognormal:sigma=0").crossbar
    assert parse_device("tile:size=8+adc:bits=6+lognormal:sigma=0").same_chips
    assert not parse_device("tile:size=8+adc:bits=6,noise=0.1+lognormal:sigma=0").same_chips
    assert parse_device(device.to_dict()["default"]) == device


def test_simulated_device_reads_the_device_back_from_a_varied_graph():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    device = parse_device("lognormal:sigma=0.4+stuck:p_off=0.01,p_on=0.02")
    device.layers["fc2"] = parse_models("quantize:levels=16")
    embedded = simulated_device(InsertVariationPass(device)(model).model)
    assert embedded.layers["conv1"] == device.default and embedded.layers["fc2"] == device.layers["fc2"]
    assert simulated_device(model) is None
