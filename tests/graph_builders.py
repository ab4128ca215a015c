"""Small ONNX graphs that reproduce the quirks of real exported models, one per builder.

Each builder returns ``(model, input_batch)``: an ONNX model as an old exporter would write it and
an input for it at its own (possibly fixed) batch size.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from rrcompile.graph import TARGET_IR_VERSION

RNG = np.random.default_rng(1234)


def _seeded(builder):
    """``builder`` drawing from a generator reseeded at every call: the same graph whatever was
    built before it, so no test depends on the order the tests run in."""
    seed = sum(map(ord, builder.__name__))

    def build() -> tuple[onnx.ModelProto, np.ndarray]:
        global RNG
        RNG = np.random.default_rng([1234, seed])
        return builder()

    build.__name__, build.__doc__ = builder.__name__, builder.__doc__
    return build


def _w(*shape: int, scale: float = 0.5) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def make_model(graph: onnx.GraphProto, **kwargs) -> onnx.ModelProto:
    """``helper.make_model`` at the IR version rrcompile targets rather than the installed onnx's
    newest: an onnxruntime older than its onnx refuses the newer IR (onnx 1.23 writes IR 14,
    onnxruntime 1.30 reads up to 13), and a test of rrcompile must not fail on that pairing."""
    model = helper.make_model(graph, **kwargs)
    model.ir_version = TARGET_IR_VERSION
    return model


def _model(nodes, inputs, outputs, inits, opset: int, ir_version: int = 7, inits_as_inputs: bool = False) -> onnx.ModelProto:
    init_protos = [numpy_helper.from_array(v, k) for k, v in inits.items()]
    graph_inputs = list(inputs)
    if inits_as_inputs:  # IR 3 exporters (CNTK) list every weight as a graph input too
        graph_inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT if v.dtype == np.float32 else TensorProto.INT64, v.shape)
                         for k, v in inits.items()]
    graph = helper.make_graph(nodes, "quirk", graph_inputs, outputs, init_protos)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def _io(name: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def cntk_conv_add_matmul() -> tuple[onnx.ModelProto, np.ndarray]:
    """mnist-8's quirks: opset 8, IR 3, weights listed as inputs, Conv + separate Add bias of shape
    [C,1,1], batch fixed at 1 in the input and in a Reshape, FC weight reshaped at run time, MatMul + Add,
    raw 0..255 input (first-layer weights scaled for it, as mnist-8's are)."""
    inits = {
        "W1": _w(4, 1, 3, 3, scale=2 / 255), "B1": _w(4, 1, 1), "flat_shape": np.array([1, 4 * 4 * 4], np.int64),
        "W2_raw": _w(4, 4, 4, 5), "W2_shape": np.array([64, 5], np.int64), "B2": _w(1, 5),
    }
    nodes = [
        helper.make_node("Reshape", ["W2_raw", "W2_shape"], ["W2"], name="fc_weight_reshape"),
        helper.make_node("Conv", ["x", "W1"], ["c1"], name="conv", kernel_shape=[3, 3], auto_pad="SAME_UPPER"),
        helper.make_node("Add", ["c1", "B1"], ["a1"], name="conv_bias"),
        helper.make_node("Relu", ["a1"], ["r1"], name="relu"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["p1", "flat_shape"], ["f1"], name="flatten"),
        helper.make_node("MatMul", ["f1", "W2"], ["m2"], name="fc"),
        helper.make_node("Add", ["m2", "B2"], ["y"], name="fc_bias"),
    ]
    model = _model(nodes, [_io("x", [1, 1, 8, 8])], [_io("y", [1, 5])], inits, opset=8, ir_version=3, inits_as_inputs=True)
    return model, RNG.random((1, 1, 8, 8), dtype=np.float32) * 255


def torch_fixed_batch_softmax() -> tuple[onnx.ModelProto, np.ndarray]:
    """lenet5_mnist's quirks: opset 9, batch fixed at 10, unnamed nodes, a Constant-node reshape
    target, Gemm(transB=1) layers and a Softmax head."""
    inits = {"W1": _w(3, 1, 3, 3), "b1": _w(3), "W2": _w(6, 48), "b2": _w(6), "W3": _w(4, 6), "b3": _w(4)}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Constant", [], ["shape"], value=numpy_helper.from_array(np.array([10, 48], np.int64))),
        helper.make_node("Reshape", ["p1", "shape"], ["f1"]),
        helper.make_node("Gemm", ["f1", "W2", "b2"], ["g2"], transB=1),
        helper.make_node("Relu", ["g2"], ["r2"]),
        helper.make_node("Gemm", ["r2", "W3", "b3"], ["g3"], transB=1),
        helper.make_node("Softmax", ["g3"], ["y"], axis=1),
    ]
    model = _model(nodes, [_io("x", [10, 1, 8, 8])], [_io("y", [10, 4])], inits, opset=9, ir_version=4)
    return model, RNG.standard_normal((10, 1, 8, 8)).astype(np.float32)


def _bn_params(c: int) -> dict[str, np.ndarray]:
    return {f"s{c}": (RNG.random(c) + 0.5).astype(np.float32), f"o{c}": _w(c), f"m{c}": _w(c),
            f"v{c}": (RNG.random(c) + 0.2).astype(np.float32)}


def batchnorm_logsoftmax() -> tuple[onnx.ModelProto, np.ndarray]:
    """BatchNormalization after a Conv and after a Gemm (opset 11 exporters keep them), a
    LogSoftmax head, Flatten, and a dead branch nobody reads."""
    # W2 at about 1/sqrt(fan-in): at 0.5 the logits reach 50, where a float32 step outgrows the 1e-5 checked
    inits = {"W1": _w(5, 2, 3, 3), "b1": _w(5), **_bn_params(5), "W2": _w(5 * 6 * 6, 7, scale=0.1), "b2": _w(7), **_bn_params(7)}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], name="conv", kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "s5", "o5", "m5", "v5"], ["n1"], name="bn1", epsilon=1e-3),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Flatten", ["r1"], ["f1"], name="flatten"),
        helper.make_node("Gemm", ["f1", "W2", "b2"], ["g2"], name="fc", alpha=0.5, beta=2.0),
        helper.make_node("BatchNormalization", ["g2", "s7", "o7", "m7", "v7"], ["n2"], name="bn2"),
        helper.make_node("LogSoftmax", ["n2"], ["y"], name="head", axis=1),
        helper.make_node("Relu", ["c1"], ["dead"], name="dead_branch"),
    ]
    model = _model(nodes, [_io("x", ["batch", 2, 8, 8])], [_io("y", ["batch", 7])], inits, opset=11)
    return model, RNG.standard_normal((3, 2, 8, 8)).astype(np.float32)


def mlp_matmul_chain() -> tuple[onnx.ModelProto, np.ndarray]:
    """A TF-style MLP: MatMul + Add with a [M] bias, a MatMul with no bias, Sigmoid/Tanh, opset 13."""
    inits = {"W1": _w(12, 16), "b1": _w(16), "W2": _w(16, 8), "W3": _w(8, 3), "b3": _w(3)}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"], name="dense1"),
        helper.make_node("Add", ["b1", "m1"], ["a1"], name="dense1_bias"),
        helper.make_node("Tanh", ["a1"], ["t1"], name="tanh"),
        helper.make_node("MatMul", ["t1", "W2"], ["m2"], name="dense2"),
        helper.make_node("Sigmoid", ["m2"], ["s2"], name="sigmoid"),
        helper.make_node("MatMul", ["s2", "W3"], ["m3"], name="dense3"),
        helper.make_node("Add", ["m3", "b3"], ["y"], name="dense3_bias"),
    ]
    model = _model(nodes, [_io("x", ["N", 12])], [_io("y", ["N", 3])], inits, opset=13)
    return model, RNG.standard_normal((4, 12)).astype(np.float32)


QUIRK_MODELS = {builder.__name__: _seeded(builder) for builder in (
    cntk_conv_add_matmul, torch_fixed_batch_softmax, batchnorm_logsoftmax, mlp_matmul_chain)}
