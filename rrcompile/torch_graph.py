"""An ONNX graph executed node by node in torch, so that its weights can be trained.

``TorchGraph(model)`` interprets a canonical (or varied, or compensated) model through ``OPS``, a
table from ONNX op to torch function; an op outside the table is refused when the module is
built, naming the node, never skipped. Trainable initializers (every analog layer's weight and
bias, and the compensation branches' weights) are ``nn.Parameter``s addressed by their ONNX
initializer names; every other initializer is a buffer. ``write_back`` puts trained values into
the model's own initializers, so the graph keeps every node, name and signature.

The ``ai.rrcompile`` ops run through the device models' own torch versions
(``DeviceModel.apply_torch``) and the compensation formulas. Noise inputs of a varied model are
either fed (then torch and onnxruntime agree on the same draws) or, when not fed, drawn inside
``forward`` from the module's seeded generator: one draw per call, i.e. one chip per mini-batch.
Initializer-backed inputs (compensation gates) can be overridden by the same feed.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper

from rrcompile.compensation import COMPENSATIONS, candidates
from rrcompile.devices import BY_OP_TYPE, noise_inputs
from rrcompile.errors import UnsupportedModelError
from rrcompile.graph import RRCOMPILE_DOMAIN, AnalogLayer, analog_layers

Tensor = torch.Tensor
OpFunction = Callable[[list, dict], list]

TORCH_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16, onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32, onnx.TensorProto.INT8: torch.int8, onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --- spatial ops --------------------------------------------------------------------------------

def _pads(attrs: dict, spatial: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
          dilations: Sequence[int]) -> list[int]:
    """ONNX pads ``[b1, .., bn, e1, .., en]``, resolving ``auto_pad``."""
    auto_pad = attrs.get("auto_pad", "NOTSET")
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(spatial, kernel, strides, dilations):
            total = max(0, (math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else large)
            ends.append(large if auto_pad == "SAME_UPPER" else small)
        return begins + ends
    if auto_pad == "VALID":
        return [0] * (2 * n)
    return list(attrs.get("pads", [0] * (2 * n)))


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX ``[b1, .., bn, e1, .., en]`` as torch's F.pad order (last dim first)."""
    n = len(pads) // 2
    return [p for i in reversed(range(n)) for p in (pads[i], pads[i + n])]


def _symmetric(pads: list[int]) -> list[int] | None:
    n = len(pads) // 2
    return pads[:n] if pads[:n] == pads[n:] else None


def _window(inputs: list, attrs: dict, kernel: Sequence[int]):
    x = inputs[0]
    n = len(kernel)
    strides = list(attrs.get("strides", [1] * n))
    dilations = list(attrs.get("dilations", [1] * n))
    return x, strides, dilations, _pads(attrs, x.shape[2:], kernel, strides, dilations)


def conv(inputs: list, attrs: dict) -> list:
    w = inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    x, strides, dilations, pads = _window(inputs, attrs, w.shape[2:])
    return [_conv(x, w, bias, strides, pads, dilations, attrs.get("group", 1))]


def _conv(x: Tensor, w: Tensor, bias, strides, pads, dilations, group: int = 1) -> Tensor:
    function = (F.conv1d, F.conv2d, F.conv3d)[w.dim() - 3]
    padding = _symmetric(pads)
    if padding is None:
        x, padding = F.pad(x, _torch_pad(pads)), [0] * (len(pads) // 2)
    return function(x, w, bias, strides, padding, dilations, group)


def max_pool(inputs: list, attrs: dict) -> list:
    kernel = attrs["kernel_shape"]
    x, strides, dilations, pads = _window(inputs, attrs, kernel)
    padding = _symmetric(pads)
    if padding is None or any(2 * p > k for p, k in zip(padding, kernel)):
        x, padding = F.pad(x, _torch_pad(pads), value=-math.inf), [0] * len(kernel)
    function = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[len(kernel) - 1]
    return [function(x, kernel, strides, padding, dilations, ceil_mode=bool(attrs.get("ceil_mode", 0)))]


def average_pool(inputs: list, attrs: dict) -> list:
    kernel = attrs["kernel_shape"]
    x, strides, _, pads = _window(inputs, attrs, kernel)
    include_pad = bool(attrs.get("count_include_pad", 0))
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    function = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[len(kernel) - 1]
    padding = _symmetric(pads)
    if padding is not None and all(2 * p <= k for p, k in zip(padding, kernel)):
        return [function(x, kernel, strides, padding, ceil_mode=ceil_mode, count_include_pad=include_pad)]
    # asymmetric pads: average the zero-padded input, dividing by the cells that count
    padded = F.pad(x, _torch_pad(pads))
    zero = [0] * len(kernel)
    sums = function(padded, kernel, strides, zero, ceil_mode=ceil_mode, count_include_pad=True)
    if include_pad:
        return [sums]
    mask = F.pad(torch.ones_like(x[:1, :1]), _torch_pad(pads))
    return [sums / function(mask, kernel, strides, zero, ceil_mode=ceil_mode, count_include_pad=True)]


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
    return [int(v) for v in tensor.reshape(-1).tolist()]


def reshape(inputs: list, attrs: dict) -> list:
    x, target = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
    return [x.reshape(target)]


def flatten(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() or 1) if attrs.get("axis", 1) < 0 else attrs.get("axis", 1)
    return [x.reshape(math.prod(x.shape[:axis]), -1)]


def _axes(inputs: list, attrs: dict) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    return attrs.get("axes")


def unsqueeze(inputs: list, attrs: dict) -> list:
    x = inputs[0]
    rank = x.dim() + len(_axes(inputs, attrs))
    for axis in sorted(a % rank for a in _axes(inputs, attrs)):
        x = x.unsqueeze(axis)
    return [x]


def squeeze(inputs: list, attrs: dict) -> list:
    x, axes = inputs[0], _axes(inputs, attrs)
    if axes is None:
        return [x.squeeze()]
    for axis in sorted((a % x.dim() for a in axes), reverse=True):
        x = x.squeeze(axis)
    return [x]


def gather(inputs: list, attrs: dict) -> list:
    data, index = inputs[0], inputs[1].long()
    axis = attrs.get("axis", 0) % data.dim()
    index = torch.where(index < 0, index + data.shape[axis], index)
    picked = torch.index_select(data, axis, index.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *index.shape, *data.shape[axis + 1:]))]


def shape(inputs: list, attrs: dict) -> list:
    dims = list(inputs[0].shape)
    dims = dims[attrs.get("start", 0):attrs["end"]] if "end" in attrs else dims[attrs.get("start", 0):]
    return [torch.tensor(dims, dtype=torch.int64, device=inputs[0].device)]


def constant(inputs: list, attrs: dict) -> list:
    if "value" in attrs:
        return [attrs["value"]]
    for key, dtype in (("value_float", torch.float32), ("value_floats", torch.float32),
                       ("value_int", torch.int64), ("value_ints", torch.int64)):
        if key in attrs:
            return [torch.tensor(attrs[key], dtype=dtype)]
    raise UnsupportedModelError(f"Constant with attributes {sorted(attrs)} is not supported")


def pad(inputs: list, attrs: dict) -> list:
    x, pads = inputs[0], _ints(inputs[1])
    if attrs.get("mode", "constant") != "constant" or (len(inputs) > 3 and inputs[3] is not None):
        raise UnsupportedModelError("Pad: only constant mode over every axis is supported")
    value = float(inputs[2]) if len(inputs) > 2 and inputs[2] is not None else 0.0
    return [F.pad(x, _torch_pad(pads), value=value)]


def clip(inputs: list, attrs: dict) -> list:
    low = inputs[1] if len(inputs) > 1 and inputs[1] is not None else attrs.get("min")
    high = inputs[2] if len(inputs) > 2 and inputs[2] is not None else attrs.get("max")
    return [torch.clamp(inputs[0], low, high)]


def divide(inputs: list, attrs: dict) -> list:
    a, b = inputs
    if not a.is_floating_point():
        return [torch.div(a, b, rounding_mode="trunc")]
    return [a / b]


def reduce_max(inputs: list, attrs: dict) -> list:
    x, axes = inputs[0], _axes(inputs, attrs)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        y = x.amax()
        return [y.reshape([1] * x.dim()) if keep else y]
    return [x.amax(dim=axes, keepdim=keep)]


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
    "Concat": lambda inputs, attrs: [torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])],
    "BatchNormalization": batch_norm,
    "Softmax": _softmax(torch.softmax), "LogSoftmax": _softmax(torch.log_softmax),
    "Dropout": lambda inputs, attrs: [inputs[0], torch.ones_like(inputs[0], dtype=torch.bool)],
    "Identity": _unary(lambda x: x), "Constant": constant,
    "Shape": shape, "Gather": gather, "Pad": pad, "ReduceMax": reduce_max,
    "Cast": lambda inputs, attrs: [inputs[0].to(TORCH_DTYPES[attrs["to"]])],
    **{f"{RRCOMPILE_DOMAIN}:{op}": _device_op(op) for op in BY_OP_TYPE},
    f"{RRCOMPILE_DOMAIN}:ConvCompensation": conv_compensation,
    f"{RRCOMPILE_DOMAIN}:DenseCompensation": dense_compensation,
}


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


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
    """``model`` as a torch module: ``forward(x, noise=None)`` returns its first output."""

    def __init__(self, model: onnx.ModelProto, trainable: Iterable[str] | None = None):
        super().__init__()
        self.nodes = list(model.graph.node)
        for node in self.nodes:
            if _op_key(node) not in OPS:
                raise UnsupportedModelError(
                    f"node '{node.name}' ({_op_key(node)}): op not supported by the torch executor")
        self.attributes = [_attributes(node) for node in self.nodes]
        self.analog_layers: list[AnalogLayer] = analog_layers(model)
        self.noise = {n.name: n for n in noise_inputs(model)}
        inits = {t.name: t for t in model.graph.initializer}
        data = [i.name for i in model.graph.input if i.name not in inits and i.name not in self.noise]
        if len(data) != 1:
            raise UnsupportedModelError(f"expected one data input, found {len(data)} ({', '.join(data)})")
        self.input_name = data[0]
        self.output_names = [o.name for o in model.graph.output]
        trainable = set(trainable_initializers(model) if trainable is None else trainable)
        self.params = torch.nn.ParameterDict()
        self._slots: dict[str, tuple[str, str]] = {}  # initializer name -> ("p" | "b", key)
        for index, (name, tensor) in enumerate(inits.items()):
            value = torch.from_numpy(numpy_helper.to_array(tensor).copy())
            key = f"t{index}"
            if name in trainable:
                self.params[key] = torch.nn.Parameter(value)
                self._slots[name] = ("p", key)
            else:
                self.register_buffer(key, value)
                self._slots[name] = ("b", key)
        self.generator: torch.Generator | None = None
        self.seed(0)

    def seed(self, seed: int) -> None:
        """Reseed the generator that draws unfed noise inputs."""
        self._seed = seed
        self.generator = None  # created on the module's device at the next draw

    def tensor(self, name: str) -> Tensor:
        kind, key = self._slots[name]
        return self.params[key] if kind == "p" else getattr(self, key)

    def parameter(self, name: str) -> torch.nn.Parameter:
        kind, key = self._slots[name]
        if kind != "p":
            raise KeyError(f"initializer '{name}' is not trainable")
        return self.params[key]

    def named_onnx_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, (kind, key) in self._slots.items():
            if kind == "p":
                yield name, self.params[key]

    def weight(self, layer: AnalogLayer) -> Tensor:
        return self.tensor(layer.weight)

    def _draw(self, device: torch.device) -> dict[str, Tensor]:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self._seed)
        draws = {}
        for name, noise in self.noise.items():
            if noise.noise.distribution == "normal":
                draws[name] = torch.randn(noise.shape, generator=self.generator, device=device)
            else:
                draws[name] = torch.rand(noise.shape, generator=self.generator, device=device)
        return draws

    def forward(self, x: Tensor, feed: dict[str, Tensor] | None = None, outputs: Sequence[str] | None = None):
        """The first graph output, or a dict of the tensors named in ``outputs``.

        ``feed`` overrides graph inputs or initializers by name: noise draws (those not fed are
        drawn from the module's generator), compensation gates.
        """
        values: dict[str, Tensor] = {name: self.tensor(name) for name in self._slots}
        values[self.input_name] = x
        if self.noise and not set(self.noise) <= set(feed or {}):
            values.update(self._draw(x.device))
        values.update(feed or {})
        for node, attrs in zip(self.nodes, self.attributes):
            results = OPS[_op_key(node)]([values[i] if i else None for i in node.input], attrs)
            values.update(zip(node.output, results))
        if outputs is not None:
            return {name: values[name] for name in outputs}
        return values[self.output_names[0]]


def write_back(module: TorchGraph, model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers hold ``module``'s trained parameters (same names, dtypes)."""
    trained = {name: p.detach().cpu().numpy() for name, p in module.named_onnx_parameters()}
    result = onnx.ModelProto.FromString(model.SerializeToString())
    for initializer in result.graph.initializer:
        if initializer.name in trained:
            dtype = helper.tensor_dtype_to_np_dtype(initializer.data_type)
            initializer.CopyFrom(numpy_helper.from_array(trained[initializer.name].astype(dtype), initializer.name))
    return result
