"""TorchGraph: every op equals onnxruntime, variation agrees on the same draws, write-back round trips."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import DIGITS_MODEL, run, with_up_weights
from graph_builders import QUIRK_MODELS
from onnx import TensorProto, helper, numpy_helper

from rrcompile.devices import DEVICE_MODELS, noise_inputs, parse_device
from rrcompile.errors import UnsupportedModelError
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.pipeline import canonicalize
from rrcompile.torch_graph import OPS, TorchGraph, write_back

RNG = np.random.default_rng(7)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def single_op(op: str, x_shape, inits: dict[str, np.ndarray] = {}, extra_inputs=(), n_outputs: int = 1, **attrs):
    """A one-node opset-17 model: data input ``x`` (+ constant inputs ``inits``), output ``y``."""
    inputs = ["x", *extra_inputs]
    node = helper.make_node(op, inputs, ["y"] + [f"extra{i}" for i in range(1, n_outputs)], name="node", **attrs)
    graph = helper.make_graph(
        [node], "op", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*values):
    return np.array(values, dtype=np.int64)


CASES = {
    "conv asymmetric pads": (single_op("Conv", [2, 3, 9, 9], {"w": w(4, 3, 3, 3), "b": w(4)}, ["w", "b"],
                                       pads=[0, 1, 2, 1], strides=[2, 1]), (2, 3, 9, 9)),
    "conv same_upper strided": (single_op("Conv", [2, 3, 8, 8], {"w": w(4, 3, 4, 4)}, ["w"], auto_pad="SAME_UPPER",
                                          strides=[3, 3]), (2, 3, 8, 8)),
    "conv dilated": (single_op("Conv", [2, 3, 9, 9], {"w": w(4, 3, 3, 3)}, ["w"], dilations=[2, 2], pads=[2, 2, 2, 2]), (2, 3, 9, 9)),
    "conv groups": (single_op("Conv", [2, 4, 6, 6], {"w": w(6, 2, 3, 3)}, ["w"], group=2, pads=[1, 1, 1, 1]), (2, 4, 6, 6)),
    "gemm transB alpha beta": (single_op("Gemm", [3, 5], {"w": w(4, 5), "c": w(4)}, ["w", "c"], transB=1, alpha=0.5,
                                         beta=2.0), (3, 5)),
    "gemm transA": (single_op("Gemm", [5, 3], {"w": w(5, 4)}, ["w"], transA=1), (5, 3)),
    "matmul batched": (single_op("MatMul", [2, 3, 5], {"w": w(5, 4)}, ["w"]), (2, 3, 5)),
    "add broadcast": (single_op("Add", [2, 3, 4], {"c": w(3, 1)}, ["c"]), (2, 3, 4)),
    "sub": (single_op("Sub", [2, 3], {"c": w(3)}, ["c"]), (2, 3)),
    "mul": (single_op("Mul", [2, 3], {"c": w(1)}, ["c"]), (2, 3)),
    "div": (single_op("Div", [2, 3], {"c": np.abs(w(3)) + 0.5}, ["c"]), (2, 3)),
    "relu": (single_op("Relu", [2, 5]), (2, 5)),
    "leaky relu": (single_op("LeakyRelu", [2, 5], alpha=0.2), (2, 5)),
    "sigmoid": (single_op("Sigmoid", [2, 5]), (2, 5)),
    "tanh": (single_op("Tanh", [2, 5]), (2, 5)),
    "clip": (single_op("Clip", [2, 5], {"lo": np.array(-0.3, np.float32), "hi": np.array(0.4, np.float32)}, ["lo", "hi"]), (2, 5)),
    "maxpool asymmetric pads": (single_op("MaxPool", [1, 2, 7, 7], kernel_shape=[3, 3], strides=[2, 2],
                                          pads=[0, 0, 1, 1]), (1, 2, 7, 7)),
    "maxpool ceil": (single_op("MaxPool", [1, 2, 8, 8], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1), (1, 2, 8, 8)),
    "avgpool pads excluded": (single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1]), (1, 2, 6, 6)),
    "avgpool pads included": (single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                        count_include_pad=1), (1, 2, 6, 6)),
    "avgpool asymmetric": (single_op("AveragePool", [1, 2, 6, 6], kernel_shape=[2, 2], strides=[2, 2],
                                     pads=[1, 0, 0, 1]), (1, 2, 6, 6)),
    "global average pool": (single_op("GlobalAveragePool", [2, 3, 4, 5]), (2, 3, 4, 5)),
    "flatten axis 2": (single_op("Flatten", [2, 3, 4, 5], axis=2), (2, 3, 4, 5)),
    "reshape 0 and -1": (single_op("Reshape", [2, 3, 4], {"s": i64(0, -1)}, ["s"]), (2, 3, 4)),
    "transpose": (single_op("Transpose", [2, 3, 4], perm=[2, 0, 1]), (2, 3, 4)),
    "concat": (single_op("Concat", [2, 3], {"c": w(2, 2)}, ["c"], axis=-1), (2, 3)),
    "batchnorm": (single_op("BatchNormalization", [2, 3, 4, 4], {"s": w(3), "b": w(3), "m": w(3), "v": np.abs(w(3)) + 0.1},
                            ["s", "b", "m", "v"], epsilon=1e-3), (2, 3, 4, 4)),
    "softmax": (single_op("Softmax", [2, 5], axis=-1), (2, 5)),
    "log softmax": (single_op("LogSoftmax", [2, 5], axis=1), (2, 5)),
    "dropout": (single_op("Dropout", [2, 5]), (2, 5)),
    "identity": (single_op("Identity", [2, 5]), (2, 5)),
    "squeeze": (single_op("Squeeze", [2, 1, 5], {"a": i64(1)}, ["a"]), (2, 1, 5)),
    "unsqueeze": (single_op("Unsqueeze", [2, 5], {"a": i64(-1, 0)}, ["a"]), (2, 5)),
    "pad": (single_op("Pad", [1, 2, 3, 3], {"p": i64(0, 0, 1, 0, 0, 0, 0, 2)}, ["p"]), (1, 2, 3, 3)),
}


def exporter_reshape_chain() -> onnx.ModelProto:
    """``x.view(x.size(0), -1)`` as exporters write it: Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"], name="shape"),
        helper.make_node("Constant", [], ["zero"], name="zero", value=numpy_helper.from_array(i64(0).reshape(()))),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes"], ["batch1"], name="unsqueeze"),
        helper.make_node("Concat", ["batch1", "minus_one"], ["target"], name="concat", axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"], name="reshape"),
        helper.make_node("Cast", ["flat"], ["y"], name="cast", to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(i64(0), "axes"), numpy_helper.from_array(i64(-1), "minus_one")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    model, shape = CASES[case]
    x = RNG.standard_normal(shape).astype(np.float32)
    torch_out = TorchGraph(model)(torch.from_numpy(x)).detach().numpy()
    np.testing.assert_allclose(torch_out, run(model, x), **TOLERANCE)


def test_exporter_shape_chain_feeds_reshape():
    model = exporter_reshape_chain()
    x = RNG.standard_normal((4, 2, 3)).astype(np.float32)
    np.testing.assert_array_equal(TorchGraph(model)(torch.from_numpy(x)).numpy(), run(model, x))


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
def test_canonical_quirk_models_match_onnxruntime_at_another_batch(name):
    model = canonicalize(QUIRK_MODELS[name]()[0])
    _, original_x = QUIRK_MODELS[name]()
    x = RNG.standard_normal((3, *original_x.shape[1:])).astype(np.float32)
    np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(x)).detach().numpy(), run(model, x), **TOLERANCE)


def test_digits_model_matches_onnxruntime():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    x = RNG.random((16, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(x)).detach().numpy(), run(model, x), **TOLERANCE)


@pytest.mark.shared
def test_real_models_match_onnxruntime(real_model):
    _, original, x = real_model
    model = canonicalize(original)
    np.testing.assert_allclose(TorchGraph(model)(torch.from_numpy(x)).detach().numpy(), run(model, x), **TOLERANCE)


ALL_MODELS = "quantize:levels=16+lognormal:sigma=0.3+programming:eta=0.02+stuck:p_off=0.05,p_on=0.05+read:eta=0.01"


def test_varied_compensated_graph_matches_onnxruntime_on_the_same_draws():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    varied = InsertVariationPass(parse_device(ALL_MODELS))(model).model
    compensated = with_up_weights(InsertCompensationCandidatesPass()(varied).model, seed=1)
    rng = np.random.default_rng(2)
    draws = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(compensated)}
    x = rng.random((8, 1, 8, 8), dtype=np.float32)
    module = TorchGraph(compensated)
    torch_out = module(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in draws.items()}).detach().numpy()
    np.testing.assert_allclose(torch_out, run(compensated, x, **draws), **TOLERANCE)


@pytest.mark.parametrize("kind", sorted(DEVICE_MODELS))
def test_torch_device_model_equals_numpy_reference(kind):
    spec = {"quantize": "quantize:levels=8", "lognormal": "lognormal:sigma=0.4", "programming": "programming:eta=0.05",
            "read": "read:eta=0.05", "stuck": "stuck:p_off=0.1,p_on=0.1"}[kind]
    (device_model,) = parse_device(spec).default
    weight = RNG.standard_normal((6, 5)).astype(np.float32)
    w_range = np.abs(weight).max()
    noise = device_model.noise.draw(RNG, weight.shape) if device_model.noise else None
    expected = device_model.apply(weight, w_range, noise)
    got = device_model.apply_torch(torch.from_numpy(weight), torch.tensor(w_range),
                                   None if noise is None else torch.from_numpy(noise))
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6, rtol=1e-6)


def test_sampled_chips_are_seeded_and_carry_gradients():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    module = TorchGraph(InsertVariationPass(parse_device("lognormal:sigma=0.5"))(model).model)
    x = torch.rand(4, 1, 8, 8)
    module.seed(3)
    first, second = module(x), module(x)
    assert not torch.equal(first, second)  # a new chip per call
    module.seed(3)
    assert torch.equal(module(x), first)
    first.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in module.named_onnx_parameters())


def test_unsupported_op_is_refused_naming_the_node():
    model = single_op("Einsum", [2, 3], equation="ij->ji")
    assert "Einsum" not in OPS
    with pytest.raises(UnsupportedModelError, match="node 'node' \\(Einsum\\)"):
        TorchGraph(model)


def test_write_back_keeps_the_graph_and_carries_trained_weights():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    module = TorchGraph(model)
    x = torch.rand(8, 1, 8, 8)
    optimizer = torch.optim.SGD([p for _, p in module.named_onnx_parameters()], lr=0.1)
    torch.nn.functional.cross_entropy(module(x), torch.arange(8)).backward()
    optimizer.step()
    trained = write_back(module, model)
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in trained.graph.node] == \
           [(n.name, n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    assert trained.graph.input == model.graph.input and trained.graph.output == model.graph.output
    assert [t.name for t in trained.graph.initializer] == [t.name for t in model.graph.initializer]
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in trained.graph.initializer}
    assert not np.array_equal(after["conv1.weight"], before["conv1.weight"])
    np.testing.assert_allclose(run(trained, x.numpy()), module(x).detach().numpy(), **TOLERANCE)
