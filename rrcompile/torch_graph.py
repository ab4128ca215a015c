"""An ONNX graph executed node by node in torch, so that its weights can be trained.

``TorchGraph(model)`` interprets a canonical (or varied, or compensated) opset-17 model through
``OPS``, a table from ONNX op to torch function; an op outside the table, or an attribute value
the table cannot honour, is refused when the module is built, naming the node, never skipped.
Trainable initializers (every analog layer's weight and bias, and the compensation branches'
weights) are ``nn.Parameter``s addressed by their ONNX initializer names; every other
initializer, and every Constant node's value, is a buffer, so ``.to(device)`` moves the whole
graph. ``write_back`` puts trained values into the model's own initializers, so the graph keeps
every node, name and signature.

The reference is onnxruntime, not the ONNX text: where the two differ (the output size of pools
in ceil mode, SAME pads of dilated pools) the torch ops follow onnxruntime, so that a model
trained here behaves the same when deployed.

The ``ai.rrcompile`` ops run through the device models' own torch versions
(``DeviceModel.apply_torch``) and the compensation formulas. Noise inputs of a varied model are
either fed (then torch and onnxruntime agree on the same draws) or, when not fed, drawn inside
``forward`` from the module's seeded generator: one draw per call, i.e. one chip per mini-batch.
Initializer-backed inputs (compensation gates) can be overridden by the same feed.

``TorchGraph(model, layer_modules=True)`` runs every analog layer whose weight is a plain
initializer as a ``torch.nn`` layer (``ConvNd`` fed its ONNX padding explicitly, ``Linear``)
held in ``layers`` in graph order: tools that act on standard layers (aihwkit's
``convert_to_analog``, torch's quantization and pruning) then see the network as they expect.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Iterable, Iterator, Sequence

import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from rrcompile.compensation import candidates
from rrcompile.crossbar import torch_ops as crossbar_torch_ops
from rrcompile.devices import BY_OP_TYPE, noise_inputs
from rrcompile.errors import OptionError, UnsupportedModelError
from rrcompile.graph import (
    RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, analog_layers, default_opset, is_default_domain, model_io,
    with_initializers,
)

Tensor = torch.Tensor
OpFunction = Callable[[list, dict], list]

TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
CONSTANT_ATTRIBUTES = {"value": None, "value_float": torch.float32, "value_floats": torch.float32,
                       "value_int": torch.int64, "value_ints": torch.int64}
PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


DEVICE_TYPES = ("auto", "cpu", "cuda")


def default_device(device_type: str = "auto") -> torch.device:
    """The torch device ``device_type`` names: ``auto`` is CUDA when torch sees a GPU, else the CPU;
    ``cuda`` without a GPU is a one-line error rather than a silent run on the CPU."""
    if device_type not in DEVICE_TYPES:
        raise OptionError(f"device type {device_type!r}: expected one of {', '.join(DEVICE_TYPES)}")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device type cuda: torch sees no CUDA GPU here (use --device-type cpu or auto)")
    if device_type != "cpu" and torch.cuda.is_available():
        _deterministic_cuda()
        return torch.device("cuda")
    return torch.device("cpu")


def _deterministic_cuda() -> None:
    """The same seed gives the same numbers on a GPU too: cuDNN's and cuBLAS's fastest kernels are
    not deterministic (on an H200, two seeded fine-tunes of the digits CNN gave different weights).
    cuBLAS reads its workspace setting when its first handle is made, so this runs before any
    CUDA work of rrcompile's; ops with no deterministic kernel warn rather than fail."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(True, warn_only=True)


# --- spatial ops --------------------------------------------------------------------------------

def _same_pads(auto_pad: str, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, .., bn, e1, .., en]`` that keep ``ceil(size / stride)`` outputs."""
    begins, ends = [], []
    for size, k, s, d in zip(spatial, kernel, strides, dilations):
        total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins + ends


def _pads(attrs: dict, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, .., bn, e1, .., en]``, resolving ``auto_pad``."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(auto_pad, spatial, kernel, strides, dilations)
    if auto_pad == "VALID":
        return [0] * (2 * len(kernel))
    return list(attrs.get("pads", [0] * (2 * len(kernel))))


def _torch_pad(pads: Sequence[int]) -> list[int]:
    """ONNX ``[b1, .., bn, e1, .., en]`` (leading axes first) in F.pad's order (last axis first)."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])]


def _symmetric(pads: list[int]) -> list[int] | None:
    n = len(pads) // 2
    return pads[:n] if pads[:n] == pads[n:] else None


def conv(inputs: list, attrs: dict) -> list:
    x, w = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    pads = _pads(attrs, x.shape[2:], w.shape[2:], strides, dilations)
    return [_conv(x, w, bias, strides, pads, dilations, attrs.get("group", 1))]


def _conv(x: Tensor, w: Tensor, bias, strides, pads, dilations, group: int = 1) -> Tensor:
    function = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
    padding = _symmetric(pads)
    if padding is None:  # torch convolutions only pad symmetrically
        x, padding = F.pad(x, _torch_pad(pads)), [0] * (len(pads) // 2)
    return function(x, w, bias, strides, padding, dilations, group)


def _pool_pads(attrs: dict, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
    """(the pads onnxruntime applies, the same pads with the ends grown to complete ceil-mode windows).

    Over the second, a floor-mode torch pool gives onnxruntime's output size: in ceil mode that
    is ``ceil((size + pads - span) / stride) + 1``, less one if the last window would start past
    the input and its begin pad.
    """
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = _onnxruntime_same_pool_pads(auto_pad, spatial, kernel, strides)
    else:
        pads = _pads(attrs, spatial, kernel, strides, dilations)
    ceil_mode = attrs.get("ceil_mode", 0)
    ends = []
    for i, (size, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
        padded, span = size + pads[i] + pads[i + n], (k - 1) * d + 1
        outputs = (-(-(padded - span) // s) if ceil_mode else (padded - span) // s) + 1
        if ceil_mode and (outputs - 1) * s >= size + pads[i]:
            outputs -= 1
        ends.append(pads[i + n] + max(0, (outputs - 1) * s + span - padded))
    return pads, pads[:n] + ends


def _onnxruntime_same_pool_pads(auto_pad: str, spatial: Sequence[int], kernel: Sequence[int],
                                strides: Sequence[int]) -> list[int]:
    """SAME pads of a pool as onnxruntime computes them: from the undilated kernel, and negative
    (cropping the input) when the stride exceeds the kernel, halved with C's truncation."""
    begins, ends = [], []
    for size, k, s in zip(spatial, kernel, strides):
        total = (math.ceil(size / s) - 1) * s + k - size
        begin = int((total if auto_pad == "SAME_UPPER" else total + 1) / 2)
        begins.append(begin)
        ends.append(total - begin)
    return begins + ends


def max_pool(inputs: list, attrs: dict) -> list:
    x, kernel = inputs[0], attrs["kernel_shape"]
    n = len(kernel)
    _, window_pads = _pool_pads(attrs, x.shape[2:])
    if any(window_pads):
        x = F.pad(x, _torch_pad(window_pads), value=-math.inf)
    function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[n - 1]
    return [function(x, kernel, attrs.get("strides", [1] * n), 0, attrs.get("dilations", [1] * n))]


def average_pool(inputs: list, attrs: dict) -> list:
    x, kernel = inputs[0], attrs["kernel_shape"]
    n = len(kernel)
    strides = attrs.get("strides", [1] * n)
    function = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[n - 1]
    pads, window_pads = _pool_pads(attrs, x.shape[2:])
    if not any(window_pads):
        return [function(x, kernel, strides)]
    # sum over the zero-padded input, divided by the cells each window counts: the input's, the
    # pads' too with count_include_pad, never the ceil-mode extension
    counted = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads), value=float(attrs.get("count_include_pad", 0)))
    extension = [window - pad for window, pad in zip(window_pads, pads)]
    sums = function(F.pad(x, _torch_pad(window_pads)), kernel, strides)
    return [sums / function(F.pad(counted, _torch_pad(extension)), kernel, strides)]


def gemm(inputs: list, attrs: dict) -> list:
    a, b = inputs[0], inputs[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    if len(inputs) > 2 and inputs[2] is not None:
        y = y + attrs.get("beta", 1.0) * inputs[2]
    return [y]


def batch_norm(inputs: list, attrs: dict) -> list:
    x, scale, bias, mean, var = inputs[:5]
    shape = [1, -1] + [1] * (x.dim() - 2)
    std = torch.sqrt(var.reshape(shape) + attrs.get("epsilon", 1e-5))
    return [(x - mean.reshape(shape)) / std * scale.reshape(shape) + bias.reshape(shape)]


# --- shape ops ----------------------------------------------------------------------------------

def _ints(tensor: Tensor) -> list[int]:
    """An int64 shape-computation tensor as the python ints torch's shape arguments take."""
    return [int(v) for v in tensor.reshape(-1).tolist()]


def reshape(inputs: list, attrs: dict) -> list:
    x, target = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return [x.reshape(target)]


def flatten(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.dim() if axis < 0 else axis
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


def unsqueeze(inputs: list, attrs: dict) -> list:
    x, axes = inputs[0], _ints(inputs[1])
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return [x]


def squeeze(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    if len(inputs) < 2 or inputs[1] is None:
        return [x.squeeze()]
    return [x.squeeze(tuple(a % x.dim() for a in _ints(inputs[1])))]


def gather(inputs: list, attrs: dict) -> list:
    data, index = inputs[0], inputs[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = torch.index_select(data, axis, index.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1:]))]


def shape(inputs: list, attrs: dict) -> list:
    dims = list(inputs[0].shape)[attrs.get("start", 0):attrs.get("end", None)]
    return [torch.tensor(dims, dtype=torch.int64, device=inputs[0].device)]


def constant(inputs: list, attrs: dict) -> list:
    (kind,) = attrs
    if kind == "value":
        return [attrs["value"]]
    return [torch.tensor(attrs[kind], dtype=CONSTANT_ATTRIBUTES[kind])]


def pad(inputs: list, attrs: dict) -> list:
    x, pads = inputs[0], _ints(inputs[1])
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0.0
    mode = PAD_MODES[attrs.get("mode", "constant")]
    if mode == "constant":
        return [F.pad(x, _torch_pad(pads), value=value)]
    # in these modes torch pads the last one to three axes of a tensor with one or two axes more
    n = x.dim()
    first = max(n - 3, 1)
    if any(pads[:first] + pads[n:n + first]):
        raise UnsupportedModelError(f"Pad in {attrs['mode']} mode: padding the first {first} axes of a rank-{n} tensor is not supported")
    return [F.pad(x, _torch_pad(pads[first:n] + pads[n + first:]), mode=mode)]


def clip(inputs: list, attrs: dict) -> list:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    return [torch.clamp(inputs[0], low, high)]


def divide(inputs: list, attrs: dict) -> list:
    a, b = inputs
    if not a.is_floating_point():  # integer Div truncates, as in C
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


def reduce_max(inputs: list, attrs: dict) -> list:
    x, keep = inputs[0], bool(attrs.get("keepdims", 1))
    return [x.amax(dim=attrs.get("axes", list(range(x.dim()))), keepdim=keep)]


def reduce_sum(inputs: list, attrs: dict) -> list:
    """ReduceSum-13: axes as an optional input (none: every axis, or none with noop_with_empty_axes)."""
    x, keep = inputs[0], bool(attrs.get("keepdims", 1))
    axes = inputs[1] if len(inputs) > 1 and inputs[1] is not None else None
    if axes is None or axes.numel() == 0:
        if attrs.get("noop_with_empty_axes", 0):
            return [x]
        axes = list(range(x.dim()))
    else:
        axes = [int(a) for a in axes]
    return [x.sum(dim=axes, keepdim=keep)]


def _unary(function: Callable[[Tensor], Tensor]) -> OpFunction:
    return lambda inputs, attrs: [function(inputs[0])]


def _binary(function: Callable[[Tensor, Tensor], Tensor]) -> OpFunction:
    return lambda inputs, attrs: [function(inputs[0], inputs[1])]


def _softmax(function) -> OpFunction:
    return lambda inputs, attrs: [function(inputs[0], dim=attrs.get("axis", -1))]


# --- ai.rrcompile ops ---------------------------------------------------------------------------

def _device_op(op_type: str) -> OpFunction:
    def run(inputs: list, attrs: dict) -> list:
        model = BY_OP_TYPE[op_type](**attrs)
        w = inputs[0]
        w_range = inputs[1] if model.reads_range() else None
        noise = inputs[-1] if model.noise is not None else None
        return [model.apply_torch(w, w_range, noise)]
    return run


def conv_compensation(inputs: list, attrs: dict) -> list:
    y, x, down, up, gate = inputs
    hidden = _conv(x, down, None, attrs["strides"], attrs["pads"], attrs["dilations"])
    n = up.dim() - 2
    return [y + gate * _conv(hidden, up, None, [1] * n, [0] * (2 * n), [1] * n)]


def dense_compensation(inputs: list, attrs: dict) -> list:
    y, x, down, up, gate = inputs
    return [y + gate * ((x @ down) @ up)]


def _calibrated(compensation: OpFunction) -> OpFunction:
    """``A * Y + B + correction``: the calibratable form of ``compensation``."""
    def run(inputs: list, attrs: dict) -> list:
        y, x, down, up, gate, gain, offset = inputs
        correction = compensation([torch.zeros_like(y), x, down, up, gate], attrs)[0]
        return [gain * y + offset + correction]
    return run


OPS: dict[str, OpFunction] = {
    "Conv": conv, "Gemm": gemm, "MatMul": _binary(torch.matmul),
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul), "Div": divide,
    "Relu": _unary(torch.relu), "Sigmoid": _unary(torch.sigmoid), "Tanh": _unary(torch.tanh),
    "Abs": _unary(torch.abs), "Exp": _unary(torch.exp), "Neg": _unary(torch.neg), "Sqrt": _unary(torch.sqrt),
    "LeakyRelu": lambda inputs, attrs: [F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))],
    "Clip": clip, "MaxPool": max_pool, "AveragePool": average_pool,
    "GlobalAveragePool": lambda inputs, attrs: [inputs[0].mean(dim=tuple(range(2, inputs[0].dim())), keepdim=True)],
    "GlobalMaxPool": lambda inputs, attrs: [inputs[0].amax(dim=tuple(range(2, inputs[0].dim())), keepdim=True)],
    "Flatten": flatten, "Reshape": reshape, "Squeeze": squeeze, "Unsqueeze": unsqueeze,
    "Transpose": lambda inputs, attrs: [inputs[0].permute(attrs.get("perm", list(reversed(range(inputs[0].dim())))))],
    "Concat": lambda inputs, attrs: [torch.cat(inputs, dim=attrs["axis"])],
    "BatchNormalization": batch_norm,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    # an evaluation graph: Dropout passes its input through whatever its training_mode input says
    "Dropout": lambda inputs, attrs: [inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)],
    "Identity": _unary(lambda x: x), "Constant": constant,
    "Shape": shape, "Gather": gather, "Pad": pad, "ReduceMax": reduce_max, "ReduceSum": reduce_sum,
    "Cast": lambda inputs, attrs: [inputs[0].to(TORCH_DTYPES[attrs["to"]])],
    **{f"{RRCOMPILE_DOMAIN}:{op}": _device_op(op) for op in BY_OP_TYPE},
    **crossbar_torch_ops(),
    f"{RRCOMPILE_DOMAIN}:ConvCompensation": conv_compensation,
    f"{RRCOMPILE_DOMAIN}:DenseCompensation": dense_compensation,
    f"{RRCOMPILE_DOMAIN}:ConvCalibration": _calibrated(conv_compensation),
    f"{RRCOMPILE_DOMAIN}:DenseCalibration": _calibrated(dense_compensation),
    **{f"{RRCOMPILE_DOMAIN}:{op}": lambda inputs, attrs: [inputs[5] * inputs[0] + inputs[6]]
       for op in ("ConvGainOffset", "DenseGainOffset")},
}


def op_key(node: onnx.NodeProto) -> str:
    """The node's key in ``OPS``: the op type, prefixed by its domain outside the default one."""
    return node.op_type if is_default_domain(node) else f"{node.domain}:{node.op_type}"


def _attributes(node: onnx.NodeProto) -> dict:
    attrs = {}
    for attribute in node.attribute:
        value = helper.get_attribute_value(attribute)
        if isinstance(value, onnx.TensorProto):
            value = torch.from_numpy(numpy_helper.to_array(value).copy())
        elif isinstance(value, bytes):
            value = value.decode()
        attrs[attribute.name] = value
    return attrs


def _refusal(node: onnx.NodeProto, attrs: dict) -> str | None:
    """Why ``node`` cannot run through ``OPS``, or None when it can."""
    key = op_key(node)
    if key not in OPS:
        return "op not supported by the torch executor"
    if key == "Constant" and (len(attrs) != 1 or not set(attrs) <= set(CONSTANT_ATTRIBUTES)):
        return f"attributes {', '.join(sorted(attrs))} not supported (only {', '.join(CONSTANT_ATTRIBUTES)})"
    if key == "Pad" and attrs.get("mode", "constant") not in PAD_MODES:
        return f"mode '{attrs['mode']}' not supported (only {', '.join(PAD_MODES)})"
    if key == "Cast" and attrs["to"] not in TORCH_DTYPES:
        return f"cast to {onnx.TensorProto.DataType.Name(attrs['to'])} not supported"
    return None


def _linear_scales(node: onnx.NodeProto, attrs: dict) -> tuple[float, float]:
    """Gemm's (alpha, beta), which a ``Linear`` holds folded into its weight and bias."""
    return (attrs.get("alpha", 1.0), attrs.get("beta", 1.0)) if node.op_type == "Gemm" else (1.0, 1.0)


def _layer_module(node: onnx.NodeProto, attrs: dict, weight: Tensor, bias: Tensor | None) -> torch.nn.Module:
    """The ``torch.nn`` layer computing analog ``node`` (Conv padding is applied before it)."""
    if node.op_type == "Conv":
        n = weight.dim() - 2
        group = attrs.get("group", 1)
        module = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)[n - 1](
            weight.shape[1] * group, weight.shape[0], tuple(weight.shape[2:]), stride=attrs.get("strides", [1] * n),
            padding=0, dilation=attrs.get("dilations", [1] * n), groups=group, bias=bias is not None)
        matrix, alpha, beta = weight, 1.0, 1.0
    else:
        if attrs.get("transA", 0) or weight.dim() != 2 or (bias is not None and bias.numel() != bias.shape[-1]):
            raise UnsupportedModelError(f"node '{node.name}' ({node.op_type}): no torch.nn.Linear for transA or for weight "
                                        f"{list(weight.shape)} with bias {None if bias is None else list(bias.shape)}")
        alpha, beta = _linear_scales(node, attrs)
        matrix = weight if attrs.get("transB", 0) else weight.T
        module = torch.nn.Linear(matrix.shape[1], matrix.shape[0], bias=bias is not None)
    with torch.no_grad():
        module.weight.copy_(alpha * matrix)
        if bias is not None:
            module.bias.copy_(beta * bias.reshape(-1))
    return module


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Analog weights and biases, and compensation branch weights (not gates), in graph order."""
    names = []
    for layer in analog_layers(model):
        names += [layer.weight] + ([layer.bias] if layer.bias else [])
    for candidate in candidates(model):
        names += [candidate.down, candidate.up]
    inits = {t.name for t in model.graph.initializer}
    return [n for n in dict.fromkeys(names) if n in inits]


class TorchGraph(torch.nn.Module):
    """``model`` as a torch module: ``forward(x, feed=None)`` returns its first output.

    ``trainable`` names the initializers that become parameters (default:
    ``trainable_initializers(model)``); the others are buffers. With ``layer_modules`` the analog
    layers are ``torch.nn`` layers in ``layers`` instead (their weights leave ``params``).
    """

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] | None = None, *, layer_modules: bool = False):
        super().__init__()
        if default_opset(model) != TARGET_OPSET:
            raise UnsupportedModelError(
                f"opset {default_opset(model)}: the torch executor runs opset {TARGET_OPSET} models (canonicalize first)")
        nodes = list(model.graph.node)
        attributes = [_attributes(node) for node in nodes]
        for node, attrs in zip(nodes, attributes):
            reason = _refusal(node, attrs)
            if reason:
                raise UnsupportedModelError(f"node '{node.name}' ({op_key(node)}): {reason}")
        self.analog_layers: list[AnalogLayer] = analog_layers(model)
        self.noise = {n.name: n for n in noise_inputs(model)}
        inits = {t.name: t for t in model.graph.initializer}
        self.input_name = model_io(model, ignore=self.noise)[0]
        self.output_names = [o.name for o in model.graph.output]

        trainable = set(trainable_initializers(model) if trainable is None else trainable)
        constants = {name: torch.from_numpy(numpy_helper.to_array(t).copy()) for name, t in inits.items()}
        # a Constant node is an initializer written another way: computed once, moved with the module
        for node, attrs in zip(nodes, attributes):
            if node.op_type == "Constant":
                constants[node.output[0]] = constant([], attrs)[0]
        self.nodes = [(node, attrs) for node, attrs in zip(nodes, attributes) if node.op_type != "Constant"]
        self.layers = torch.nn.ModuleDict()
        self._layer_of: dict[str, tuple[str, AnalogLayer]] = {}  # node name -> (key in ``layers``, layer)
        if layer_modules:
            for layer in self.analog_layers:
                node, attrs = next((n, a) for n, a in self.nodes if n.name == layer.node)
                uses = sum(name in (layer.weight, layer.bias) for n, _ in self.nodes for name in n.input)
                if node.input[1] != layer.weight or uses != 1 + bool(layer.bias):  # varied, or shared
                    continue
                bias = constants.pop(layer.bias) if layer.bias else None
                key = f"l{len(self.layers)}"
                self.layers[key] = _layer_module(node, attrs, constants.pop(layer.weight), bias)
                self._layer_of[node.name] = (key, layer)
        self.params = torch.nn.ParameterDict()
        # ONNX name -> key in ``params`` or buffer name (ParameterDict keys cannot hold '.')
        self._keys: dict[str, str] = {}
        for index, (name, value) in enumerate(constants.items()):
            key = f"t{index}"
            if name in trainable:
                self.params[key] = torch.nn.Parameter(value)
            else:
                self.register_buffer(key, value)
            self._keys[name] = key
        self._generator: torch.Generator | None = None
        self.seed(0)

    def seed(self, seed: int) -> None:
        """Reseed the generator that draws unfed noise inputs."""
        self._seed = seed
        self._generator = None  # created on the module's device at the next draw

    def tensor(self, name: str) -> Tensor:
        """The current value of initializer (or Constant output) ``name``."""
        key = self._keys[name]
        return self.params[key] if key in self.params else getattr(self, key)

    def parameter(self, name: str) -> torch.nn.Parameter:
        key = self._keys[name]
        if key not in self.params:
            raise KeyError(f"initializer '{name}' is not trainable")
        return self.params[key]

    def named_onnx_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """(initializer name, parameter) for every trainable initializer."""
        for name, key in self._keys.items():
            if key in self.params:
                yield name, self.params[key]

    def weight(self, layer: AnalogLayer) -> Tensor:
        return self.tensor(layer.weight)

    def _draw(self, device: torch.device) -> dict[str, Tensor]:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        draw = {"normal": torch.randn, "uniform": torch.rand}
        return {name: draw[noise.noise.distribution](noise.shape, generator=self._generator, device=device)
                for name, noise in self.noise.items()}

    def forward(self, x: Tensor, feed: dict[str, Tensor] | None = None, outputs: Sequence[str] | None = None,
                intercept: Callable[[onnx.NodeProto, dict, list], list | None] | None = None):
        """The first graph output, or a dict of the tensors named in ``outputs``.

        ``feed`` overrides graph inputs or initializers by name: noise draws (when any noise input
        is not fed, all are drawn from the module's generator first, so one call is one chip) and
        compensation gates. ``intercept(node, attrs, inputs)`` sees every node before it runs and may
        return its outputs instead (a programmed chip computing the analog layers, a calibration
        solving a compensation node's parameters on the way).
        """
        feed = feed or {}
        values: dict[str, Tensor] = {name: self.tensor(name) for name in self._keys}
        values[self.input_name] = x
        if not set(self.noise) <= set(feed):
            values.update(self._draw(x.device))
        values.update(feed)
        for node, attrs in self.nodes:
            if intercept is not None:
                results = intercept(node, attrs, [values[i] if i else None for i in node.input])
                if results is not None:
                    values.update(zip(node.output, results))
                    continue
            if node.name in self._layer_of:
                values[node.output[0]] = self._run_layer(node, attrs, values[node.input[0]])
                continue
            results = OPS[op_key(node)]([values[i] if i else None for i in node.input], attrs)
            values.update(zip(node.output, results))
        if outputs is not None:
            return {name: values[name] for name in outputs}
        return values[self.output_names[0]]

    def _run_layer(self, node: onnx.NodeProto, attrs: dict, x: Tensor) -> Tensor:
        key, layer = self._layer_of[node.name]
        if node.op_type == "Conv":
            shape = layer.weight_shape
            n = len(shape) - 2
            x = F.pad(x, _torch_pad(_pads(attrs, x.shape[2:], shape[2:], attrs.get("strides", [1] * n),
                                          attrs.get("dilations", [1] * n))))
        return self.layers[key](x)

    def layer_initializers(self) -> Iterator[tuple[str, Tensor]]:
        """(initializer name, value in the ONNX layout) for the weights held by ``layers``."""
        for node, attrs in self.nodes:
            if node.name not in self._layer_of:
                continue
            key, layer = self._layer_of[node.name]
            module = self.layers[key]
            alpha, beta = _linear_scales(node, attrs)
            transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not attrs.get("transB", 0))
            yield layer.weight, (module.weight.T if transposed else module.weight) / alpha
            if layer.bias:
                yield layer.bias, module.bias / beta


def write_back(module: TorchGraph, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold ``module``'s trained parameters (same names, dtypes)."""
    return with_initializers(model, {name: p.detach().cpu().numpy()
                                     for name, p in [*module.named_onnx_parameters(), *module.layer_initializers()]})


class TorchSession:
    """``model`` on the torch executor behind onnxruntime's session interface (``run(names, feed)``
    -> numpy arrays): the Monte Carlo evaluator's GPU path where onnxruntime has no CUDA provider
    (``rrcompile.evaluate`` says why)."""

    def __init__(self, model: onnx.ModelProto, device: torch.device):
        self.device = device
        self.graph = TorchGraph(model, trainable=[]).to(device).eval()

    def run(self, output_names: Sequence[str] | None, feed: dict) -> list:
        x = torch.as_tensor(feed[self.graph.input_name], device=self.device)
        rest = {name: torch.as_tensor(value, device=self.device) for name, value in feed.items()
                if name != self.graph.input_name}
        names = list(output_names or self.graph.output_names)
        # cuDNN would compute float32 convolutions in TF32 (10-bit mantissa), no longer onnxruntime's numbers
        with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            values = self.graph(x, rest, outputs=names)
        return [values[name].cpu().numpy() for name in names]
