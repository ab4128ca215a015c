"""TorchGraph: every op equals onnxruntime, variation agrees on the same draws, write-back round trips."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from conftest import DIGITS_MODEL, run, with_up_weights
from graph_builders import QUIRK_MODELS, make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.crossbar import adc_ranges
from rrcompile.devices import DEVICE_MODELS, noise_inputs, parse_device
from rrcompile.errors import UnsupportedModelError
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.pipeline import canonicalize
from rrcompile.torch_graph import OPS, TorchGraph, op_key, write_back

RNG = np.random.default_rng(7)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def graph_model(nodes, x_shape, inits: dict[str, np.ndarray] = {}, opset: int = 17) -> onnx.ModelProto:
    """An opset-17 model over data input ``x`` (+ initializers ``inits``) whose output is ``y``, of any type."""
    graph = helper.make_graph(
        nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)], [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def single_op(op: str, x_shape, inits: dict[str, np.ndarray] = {}, extra_inputs=(), **attrs) -> onnx.ModelProto:
    """A one-node model ``y = op(x, *extra_inputs)``, the extra inputs being initializers in ``inits``."""
    return graph_model([helper.make_node(op, ["x", *extra_inputs], ["y"], name="node", **attrs)], x_shape, inits)


def with_constant(op: str, x_shape, **constant) -> onnx.ModelProto:
    """``y = op(x, c)`` with ``c`` the output of a Constant node carrying the attribute ``constant``."""
    return graph_model([helper.make_node("Constant", [], ["c"], name="c", **constant),
                        helper.make_node(op, ["x", "c"], ["y"], name="node")], x_shape)


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


def case(model: onnx.ModelProto, x: np.ndarray | None = None) -> tuple[onnx.ModelProto, np.ndarray]:
    """(model, input): a standard-normal input of the model's input shape unless ``x`` is given."""
    shape = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    return model, w(*shape) if x is None else x


CASES = {
    "conv asymmetric pads": case(single_op("Conv", [2, 3, 9, 9], {"w": w(4, 3, 3, 3), "b": w(4)}, ["w", "b"],
                                           pads=[0, 1, 2, 1], strides=[2, 1])),
    "conv same_upper strided": case(single_op("Conv", [2, 3, 8, 8], {"w": w(4, 3, 4, 4)}, ["w"], auto_pad="SAME_UPPER",
                                              strides=[3, 3])),
    "conv same_lower": case(single_op("Conv", [2, 3, 7, 7], {"w": w(4, 3, 2, 2)}, ["w"], auto_pad="SAME_LOWER",
                                      strides=[2, 2])),
    "conv valid 1d": case(single_op("Conv", [2, 3, 10], {"w": w(4, 3, 3)}, ["w"], auto_pad="VALID", strides=[2])),
    "conv dilated": case(single_op("Conv", [2, 3, 9, 9], {"w": w(4, 3, 3, 3)}, ["w"], dilations=[2, 2], pads=[2, 2, 2, 2])),
    "conv groups": case(single_op("Conv", [2, 4, 6, 6], {"w": w(6, 2, 3, 3)}, ["w"], group=2, pads=[1, 1, 1, 1])),
    "gemm transB alpha beta": case(single_op("Gemm", [3, 5], {"w": w(4, 5), "c": w(4)}, ["w", "c"], transB=1,
                                             alpha=0.5, beta=2.0)),
    "gemm transA": case(single_op("Gemm", [5, 3], {"w": w(5, 4)}, ["w"], transA=1)),
    "matmul batched": case(single_op("MatMul", [2, 3, 5], {"w": w(5, 4)}, ["w"])),
    "add broadcast": case(single_op("Add", [2, 3, 4], {"c": w(3, 1)}, ["c"])),
    "sub": case(single_op("Sub", [2, 3], {"c": w(3)}, ["c"])),
    "mul": case(single_op("Mul", [2, 3], {"c": w(1)}, ["c"])),
    "div": case(single_op("Div", [2, 3], {"c": np.abs(w(3)) + 0.5}, ["c"])),
    "relu": case(single_op("Relu", [2, 5])),
    "leaky relu": case(single_op("LeakyRelu", [2, 5], alpha=0.2)),
    "sigmoid": case(single_op("Sigmoid", [2, 5])),
    "tanh": case(single_op("Tanh", [2, 5])),
    "abs": case(single_op("Abs", [2, 5])),
    "exp": case(single_op("Exp", [2, 5])),
    "neg": case(single_op("Neg", [2, 5])),
    "sqrt": case(single_op("Sqrt", [2, 5]), np.abs(w(2, 5))),
    "clip": case(single_op("Clip", [2, 5], {"lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}, ["lo", "hi"])),
    "clip min only": case(single_op("Clip", [2, 5], {"lo": np.array(-0.3, np.float32)}, ["lo"])),
    "maxpool asymmetric pads": case(single_op("MaxPool", [1, 2, 7, 7], kernel_shape=[3, 3], strides=[2, 2],
                                              pads=[0, 0, 1, 1])),
    "maxpool ceil": case(single_op("MaxPool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)),
    # the ceil-mode window onnxruntime drops: it would start in the end pad
    "maxpool ceil asymmetric": case(single_op("MaxPool", [1, 2, 8, 8], kernel_shape=[3, 4], strides=[2, 2],
                                              pads=[0, 0, 2, 1], ceil_mode=1)),
    "maxpool same_upper dilated": case(single_op("MaxPool", [1, 2, 9, 9], kernel_shape=[2, 3], strides=[1, 2],
                                                 dilations=[2, 2], auto_pad="SAME_UPPER")),
    "maxpool same_upper stride beyond kernel": case(single_op("MaxPool", [1, 2, 6, 6], kernel_shape=[2, 1], strides=[3, 3],
                                                              dilations=[2, 2], auto_pad="SAME_UPPER", ceil_mode=1)),
    "avgpool pads excluded": case(single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1])),
    "avgpool pads included": case(single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                            count_include_pad=1)),
    "avgpool asymmetric": case(single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[2, 2], strides=[2, 2],
                                         pads=[1, 0, 0, 1])),
    "avgpool ceil pads included": case(single_op("AveragePool", [1, 2, 7, 5], kernel_shape=[3, 3], strides=[3, 1],
                                                 pads=[2, 1, 2, 2], ceil_mode=1, count_include_pad=1)),
    "avgpool ceil pads excluded": case(single_op("AveragePool", [1, 2, 5, 4], kernel_shape=[2, 3], strides=[3, 3],
                                                 pads=[1, 1, 1, 2], ceil_mode=1)),
    "avgpool same_upper": case(single_op("AveragePool", [1, 2, 7, 7], kernel_shape=[3, 3], strides=[2, 2],
                                         auto_pad="SAME_UPPER")),
    "global average pool": case(single_op("GlobalAveragePool", [2, 3, 4, 5])),
    "global max pool": case(single_op("GlobalMaxPool", [2, 3, 4, 5])),
    "flatten axis 2": case(single_op("Flatten", [2, 3, 4, 5], axis=2)),
    "flatten axis 0": case(single_op("Flatten", [2, 3, 4], axis=0)),
    "flatten axis -1": case(single_op("Flatten", [2, 3, 4], axis=-1)),
    "reshape 0 and -1": case(single_op("Reshape", [2, 3, 4], {"s": i64(0, -1)}, ["s"])),
    "transpose": case(single_op("Transpose", [2, 3, 4], perm=[2, 0, 1])),
    "transpose default perm": case(single_op("Transpose", [2, 3, 4])),
    "concat": case(single_op("Concat", [2, 3], {"c": w(2, 2)}, ["c"], axis=-1)),
    "batchnorm": case(single_op("BatchNormalization", [2, 3, 4, 4], {"s": w(3), "b": w(3), "m": w(3), "v": np.abs(w(3)) + 0.1},
                                ["s", "b", "m", "v"], epsilon=1e-3)),
    "softmax": case(single_op("Softmax", [2, 5], axis=-1)),
    "softmax middle axis": case(single_op("Softmax", [2, 3, 4], axis=1)),
    "log softmax": case(single_op("LogSoftmax", [2, 5], axis=1)),
    "dropout": case(single_op("Dropout", [2, 5])),
    "identity": case(single_op("Identity", [2, 5])),
    "squeeze": case(single_op("Squeeze", [2, 1, 5], {"a": i64(1)}, ["a"])),
    "squeeze every unit axis": case(single_op("Squeeze", [2, 1, 5, 1])),
    "unsqueeze negative axes": case(single_op("Unsqueeze", [2, 5], {"a": i64(-1, 0)}, ["a"])),
    "gather negative indices": case(single_op("Gather", [3, 4], {"i": i64(0, -1, 2, 1).reshape(2, 2)}, ["i"], axis=-1)),
    "shape start end": case(single_op("Shape", [2, 3, 4, 5], start=1, end=-1)),
    "cast": case(single_op("Cast", [2, 5], to=TensorProto.INT64), w(2, 5) * 4),
    "constant value": case(with_constant("Sub", [2, 3], value=numpy_helper.from_array(w(2, 3)))),
    "constant value_float": case(with_constant("Mul", [2, 3], value_float=2.5)),
    "constant value_floats": case(with_constant("Add", [2, 3], value_floats=[1.0, -2.0, 0.5])),
    "constant value_int": case(with_constant("Gather", [2, 3], value_int=-1)),
    "constant value_ints": case(with_constant("Reshape", [2, 3, 4], value_ints=[0, -1])),
    "pad constant value": case(single_op("Pad", [1, 2, 3, 3], {"p": i64(0, 0, 1, 0, 0, 0, 0, 2), "v": np.array(1.5, np.float32)},
                                         ["p", "v"])),
    "pad reflect": case(single_op("Pad", [1, 2, 4, 4], {"p": i64(0, 0, 1, 2, 0, 0, 2, 1)}, ["p"], mode="reflect")),
    "pad edge": case(single_op("Pad", [1, 2, 4, 4], {"p": i64(0, 0, 0, 2, 0, 0, 0, 1)}, ["p"], mode="edge")),
    "reduce max axes": case(single_op("ReduceMax", [2, 3, 4], axes=[-1, 0], keepdims=0)),
    "reduce max all": case(single_op("ReduceMax", [2, 3, 4])),
    "reduce sum axes input": case(single_op("ReduceSum", [2, 3, 4], {"a": i64(-1, 1)}, ["a"], keepdims=0)),
    "reduce sum all": case(single_op("ReduceSum", [2, 3, 4])),
}


def exporter_reshape_chain() -> onnx.ModelProto:
    """``x.view(x.size(0), -1)`` as exporters write it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Constant", [], ["zero"], name="zero", value=numpy_helper.from_array(i64(0).reshape(()))),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape"),
    ]
    return graph_model(nodes, ["N", 2, 3], {"axes": i64(0), "minus_one": i64(-1)})


ALL_MODELS = "quantize:levels=16+lognormal:sigma=0.3+programming:eta=0.02+stuck:p_off=0.05,p_on=0.05+read:eta=0.01"


@pytest.fixture(scope="module")
def digits() -> onnx.ModelProto:
    return canonicalize(onnx.load(str(DIGITS_MODEL)))


@pytest.fixture(scope="module")
def compensated_varied(digits) -> onnx.ModelProto:
    """The digits CNN with every device model and a compensation candidate (random up weights) per layer."""
    varied = InsertVariationPass(parse_device(ALL_MODELS))(digits).model
    return with_up_weights(InsertCompensationCandidatesPass()(varied).model, seed=1)


@pytest.fixture(scope="module")
def calibrated_varied(digits) -> onnx.ModelProto:
    """The digits CNN varied, with a calibratable slot per layer (random per-chip parameters), one of rank 0."""
    varied = InsertVariationPass(parse_device("lognormal:sigma=0.5+read:eta=0.02"))(digits).model
    slots = InsertCompensationCandidatesPass(ranks={"conv1": 2, "conv2": 0, "fc1": 3, "fc2": 0}, calibrated=True)(varied)
    return with_up_weights(slots.model, seed=3, scale=0.2)


@pytest.fixture(scope="module")
def crossbar_varied(digits) -> onnx.ModelProto:
    """The digits CNN on 20-row tiles with noisy 12-bit ADCs and differential pairs, the classifier's ADCs
    noiseless (ADC ranges from random images)."""
    device = parse_device("tile:size=20,cols=6+adc:bits=12,noise=0.01+lognormal:sigma=0.3,mapping=differential")
    device.layers["fc2"] = parse_device("tile:size=20+adc:bits=12").default
    return InsertVariationPass(device, adc_ranges(digits, device, RNG.random((16, 1, 8, 8), dtype=np.float32)))(digits).model


def test_crossbar_graph_matches_onnxruntime_on_the_same_draws(crossbar_varied):
    rng = np.random.default_rng(5)
    draws = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(crossbar_varied)}
    x = rng.random((8, 1, 8, 8), dtype=np.float32)
    expected = run(crossbar_varied, x, **draws)
    # another summation order can put a partial sum on the neighbouring ADC level (a step is 1/2047 of its range)
    assert np.abs(torch_run(TorchGraph(crossbar_varied), x, **draws) - expected).max() <= 1e-3 * np.abs(expected).max()


def test_calibrated_graph_matches_onnxruntime_on_the_same_draws(calibrated_varied):
    rng = np.random.default_rng(4)
    draws = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(calibrated_varied)}
    x = rng.random((8, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(torch_run(TorchGraph(calibrated_varied), x, **draws),
                               run(calibrated_varied, x, **draws), **TOLERANCE)


def torch_run(module: TorchGraph, x: np.ndarray, **feed: np.ndarray) -> np.ndarray:
    return module(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in feed.items()}).detach().numpy()


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_matches_onnxruntime(name):
    model, x = CASES[name]
    np.testing.assert_allclose(torch_run(TorchGraph(model), x), run(model, x), **TOLERANCE)


def test_every_table_entry_is_checked_against_onnxruntime(compensated_varied, calibrated_varied, crossbar_varied):
    checked = {op_key(node) for model in [*(m for m, _ in CASES.values()), exporter_reshape_chain(), compensated_varied,
                                          calibrated_varied, crossbar_varied]
               for node in model.graph.node}
    assert set(OPS) - checked == set()


def test_exporter_shape_chain_feeds_reshape():
    model = exporter_reshape_chain()
    x = w(4, 2, 3)
    np.testing.assert_array_equal(torch_run(TorchGraph(model), x), run(model, x))


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_canonical_quirk_models_match_onnxruntime_at_another_batch(name):
    original, original_x = QUIRK_MODELS[name]()
    model = canonicalize(original)
    x = RNG.standard_normal((3, *original_x.shape[1:])).astype(np.float32)
    np.testing.assert_allclose(torch_run(TorchGraph(model), x), run(model, x), **TOLERANCE)


def test_digits_model_matches_onnxruntime(digits):
    x = RNG.random((16, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(torch_run(TorchGraph(digits), x), run(digits, x), **TOLERANCE)


@pytest.mark.shared
def test_real_models_match_onnxruntime(real_model):
    _, original, x = real_model
    model = canonicalize(original)
    np.testing.assert_allclose(torch_run(TorchGraph(model), x), run(model, x), **TOLERANCE)


def test_varied_compensated_graph_matches_onnxruntime_on_the_same_draws(compensated_varied):
    rng = np.random.default_rng(2)
    draws = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(compensated_varied)}
    assert len(draws) == 4 * 4  # lognormal, programming, stuck and read noise on each of the 4 layers
    x = rng.random((8, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(torch_run(TorchGraph(compensated_varied), x, **draws),
                               run(compensated_varied, x, **draws), **TOLERANCE)


@pytest.mark.parametrize("kind", [*sorted(DEVICE_MODELS), "lognormal differential"])
def test_torch_device_model_equals_numpy_reference(kind):
    spec = {"quantize": "quantize:levels=8", "lognormal": "lognormal:sigma=0.4", "programming": "programming:eta=0.05",
            "read": "read:eta=0.05", "stuck": "stuck:p_off=0.1,p_on=0.1",
            "lognormal differential": "lognormal:sigma=0.4,mapping=differential,g0=0.2"}[kind]
    (device_model,) = parse_device(spec).default
    weight = w(6, 5)
    w_range = np.abs(weight).max()
    noise = device_model.noise.draw(RNG, device_model.noise_shape(weight.shape)) if device_model.noise else None
    expected = device_model.apply(weight, w_range, noise)
    got = device_model.apply_torch(torch.from_numpy(weight), torch.tensor(w_range),
                                   None if noise is None else torch.from_numpy(noise))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)


def test_sampled_chips_are_seeded_and_carry_gradients(digits):
    module = TorchGraph(InsertVariationPass(parse_device("lognormal:sigma=0.5+stuck:p_off=0.05,p_on=0"))(digits).model)
    x = torch.rand(4, 1, 8, 8)
    module.seed(3)
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # a new chip per call
    module.seed(3)
    assert torch.equal(module(x), first)
    module.seed(4)
    assert not torch.equal(module(x), first)
    first.sum().backward()
    weights = {layer.weight for layer in module.analog_layers}
    grads = {name: p.grad for name, p in module.named_onnx_parameters()}
    assert weights <= set(grads) and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_analog_weights_and_biases_are_parameters_other_constants_buffers():
    model = canonicalize(QUIRK_MODELS["torch_fixed_batch_softmax"]()[0])
    module = TorchGraph(model)
    layers = module.analog_layers
    expected = [name for layer in layers for name in (layer.weight, layer.bias)]
    assert [name for name, _ in module.named_onnx_parameters()] == expected
    assert list(module.parameters()) == [module.parameter(name) for name in expected]
    first_weight = next(t for t in model.graph.initializer if t.name == layers[0].weight)
    np.testing.assert_array_equal(module.weight(layers[0]).detach().numpy(), numpy_helper.to_array(first_weight))
    int_constants = [t.name for t in model.graph.initializer if t.data_type == TensorProto.INT64]
    assert int_constants and all(module.tensor(name).dtype == torch.int64 for name in int_constants)
    with pytest.raises(KeyError):
        module.parameter(int_constants[0])


def test_every_tensor_moves_with_the_module():
    """Constant-node values included: on another device (here ``meta``) no tensor is left behind."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Constant", [], ["shift"], name="shift", value=numpy_helper.from_array(w(4, 1, 1))),
        helper.make_node("Add", ["c", "shift"], ["a"], name="add"),
        helper.make_node("MaxPool", ["a"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
    ]
    module = TorchGraph(graph_model(nodes, ["N", 2, 5, 5], {"w": w(4, 2, 3, 3), "fc": w(3, 36)})).to("meta")
    assert module(torch.empty(2, 2, 5, 5, device="meta")).shape == (2, 3)


@pytest.mark.parametrize("model, message", [
    (single_op("Einsum", [2, 3], equation="ij->ji"), r"node 'node' \(Einsum\): op not supported by the torch executor"),
    (single_op("Cast", [2, 3], to=TensorProto.STRING), r"node 'node' \(Cast\): cast to STRING not supported"),
    (graph_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [2], opset=13), r"opset 13: .* opset 17 models"),
], ids=["unknown op", "unsupported attribute", "other opset"])
def test_unsupported_models_are_refused_when_built(model, message):
    with pytest.raises(UnsupportedModelError, match=message):
        TorchGraph(model)


def test_write_back_keeps_the_graph_and_carries_trained_weights(digits):
    module = TorchGraph(digits)
    x = torch.rand(8, 1, 8, 8)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    torch.nn.functional.cross_entropy(module(x), torch.arange(8)).backward()
    optimizer.step()
    trained = write_back(module, digits)
    assert trained.graph.node == digits.graph.node
    assert trained.graph.input == digits.graph.input and trained.graph.output == digits.graph.output
    assert [(t.name, t.data_type, list(t.dims)) for t in trained.graph.initializer] == \
           [(t.name, t.data_type, list(t.dims)) for t in digits.graph.initializer]
    before = {t.name: numpy_helper.to_array(t) for t in digits.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert all(not np.array_equal(after[name], before[name]) for name, _ in module.named_onnx_parameters())
    np.testing.assert_array_equal(after["conv1.weight"], module.parameter("conv1.weight").detach().numpy())
    np.testing.assert_allclose(run(trained, x.numpy()), module(x).detach().numpy(), **TOLERANCE)


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_layer_modules_compute_what_the_op_table_computes(name):
    original, original_x = QUIRK_MODELS[name]()
    model = canonicalize(original)
    modules = TorchGraph(model, layer_modules=True)
    assert len(modules.layers) == len(modules.analog_layers)
    assert all(isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)) for m in modules.layers.values())
    x = RNG.standard_normal((3, *original_x.shape[1:])).astype(np.float32)
    np.testing.assert_allclose(torch_run(modules, x), run(model, x), **TOLERANCE)


def test_layer_modules_write_back_in_the_onnx_layout():
    model = graph_model([helper.make_node("Gemm", ["x", "W", "B"], ["y"], name="fc", alpha=0.5, beta=2.0)], [4, 3],
                        {"W": w(3, 5), "B": w(1, 5)})  # transB=0: Linear holds alpha * W transposed
    module = TorchGraph(model, layer_modules=True)
    with torch.no_grad():
        module.layers["l0"].weight.mul_(2)
    trained = write_back(module, model)
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    np.testing.assert_array_equal(after["W"], 2 * numpy_helper.to_array(model.graph.initializer[0]))
    assert after["B"].shape == (1, 5)
    x = w(4, 3)
    np.testing.assert_allclose(run(trained, x), torch_run(module, x), **TOLERANCE)


def test_layer_modules_refuse_a_gemm_linear_cannot_express():
    model = graph_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="fc", transA=1)], [3, 4], {"W": w(3, 5)})
    with pytest.raises(UnsupportedModelError, match=r"node 'fc' \(Gemm\): no torch.nn.Linear for transA"):
        TorchGraph(model, layer_modules=True)


def test_torch_session_runs_a_chip_as_onnxruntime_does():
    """The Monte Carlo evaluator's GPU path, on the CPU: the same chip, the same accuracy."""
    from rrcompile.data import Preprocess, load_data
    from rrcompile.evaluate import MonteCarloEvaluator, session_accuracy
    from rrcompile.torch_graph import TorchSession

    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    data = load_data("digits", "test").subset(200)
    x = Preprocess.parse("255", "0", "1").apply(data.x)
    evaluator = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0.5+read:eta=0.01"))
    onnxruntime_session, feed = evaluator.chip(seed=0, chip=2)
    fixed = feed()  # one read, so both runs see the same weights
    torch_session = TorchSession(evaluator.varied_model, torch.device("cpu"))
    expected = onnxruntime_session.run(None, {"image": x, **fixed})[0]
    np.testing.assert_allclose(torch_session.run(None, {"image": x, **fixed})[0], expected, atol=1e-4, rtol=1e-4)
    assert session_accuracy(torch_session, "image", x, data.y, 64, lambda: fixed) == \
        session_accuracy(onnxruntime_session, "image", x, data.y, 64, lambda: fixed)


def test_cuda_without_a_gpu_is_refused_and_auto_falls_back_to_the_cpu(monkeypatch):
    from rrcompile.errors import OptionError
    from rrcompile.torch_graph import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_device("auto").type == default_device("cpu").type == "cpu"
    with pytest.raises(OptionError, match="no CUDA GPU"):
        default_device("cuda")
    with pytest.raises(OptionError, match="expected one of auto, cpu, cuda"):
        default_device("tpu")


def test_choosing_a_gpu_makes_torch_deterministic(monkeypatch):
    """Seeded runs repeat on a GPU only with cuDNN's and cuBLAS's deterministic kernels (checked
    here with the GPU stubbed: the flags are what a real one needs)."""
    from rrcompile.torch_graph import default_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    try:
        assert default_device("auto").type == "cuda"
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
