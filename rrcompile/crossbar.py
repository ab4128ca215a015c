"""The crossbar a layer runs on: tiles, their partial sums, ADCs, digital accumulation.

The ``tile`` and ``adc`` device terms (:class:`rrcompile.devices.Tile`, :class:`rrcompile.devices.Adc`)
change how an analog layer computes, not its weight, so :class:`InsertVariationPass` rewrites the
layer itself. A layer ``Y = op(X, W) + b`` with ``T`` row tiles becomes, all in standard ops and
``ai.rrcompile`` model-local functions that stock onnxruntime runs::

    W' = <weight effects>(W)                        # the varied weight, per cell, as before
    Wt = TileWeight(W', mask, shape)                # T masked copies of W', interleaved per column
    P  = op(X, Wt)                                  # the analog layer itself: every tile's partial
                                                    #   sums at once, column m*T + t = tile t of column m
    G  = TileSplitConv(P) | TileSplitDense(P)       # [..., M, T, ...]: the tile axis made explicit
    Q  = Adc(G, A) | AdcNoise(G, A, Z)              # each partial sum clipped and quantized (no ADC term: Q = G)
    Y  = ReduceSum(Q, tile axis) (+ b)              # digital accumulation, then the digital bias

The masks partition the rows (tile ``t`` keeps rows ``t*size ..``, in the weight's own row order:
``Cin/group x kh x kw`` for a convolution, as ``inspect`` counts them), so ``sum_t P_t`` is the
untiled product and with an ideal ADC the rewrite changes nothing. The analog node keeps its name,
op, attributes and data input, so every tool that finds analog layers still finds it; its bias
moves after the accumulation (digital, like aihwkit's ``digital_bias``). The cost is ``T`` times
the layer's multiply-accumulates in simulation, the price of masking rather than slicing (tile
boundaries cut through convolution kernels).

The ADC full scale ``A`` (``<layer>.adc_range``, one value per tile and column block, stored per
column as ``[M, T]``) is fixed at compile time from the clean network's partial sums on training
images (:func:`adc_ranges`); randomness stays outside the graph: ADC noise is a graph input drawn
for every inference, like read noise.

Each function has a numpy reference (``*_reference``) and a torch version (``torch_ops``), the ADC's
with a straight-through gradient (rounding passes the gradient, clipping stops it outside ``[-A, A]``).
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rrcompile.devices import ADC_NOISE_OP, ADC_RANGE_SUFFIX, Adc, DeviceConfig, Tile, crossbar_models
from rrcompile.errors import DeviceSpecError
from rrcompile.graph import (
    RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, analog_layers, remove_unused_functions, tensor_shapes,
)

if TYPE_CHECKING:
    import torch

TILE_WEIGHT, TILE_SPLIT_CONV, TILE_SPLIT_DENSE, ADC = "TileWeight", "TileSplitConv", "TileSplitDense", "Adc"
CROSSBAR_OPS = (TILE_WEIGHT, TILE_SPLIT_CONV, TILE_SPLIT_DENSE, ADC, ADC_NOISE_OP)
TINY = 1e-30  # the smallest ADC step: a tile whose clean partial sums are all zero converts to zero
ADC_IMAGES = 256  # training images that fix the ADC ranges, by default


def is_crossbar(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is one of the crossbar functions (tiling, ADC)."""
    return node.domain == RRCOMPILE_DOMAIN and node.op_type in CROSSBAR_OPS


def is_adc(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is an ADC (with or without noise)."""
    return node.domain == RRCOMPILE_DOMAIN and node.op_type in (ADC, ADC_NOISE_OP)


# --- the ONNX functions -------------------------------------------------------------------------

def _attr_constant(attribute: str, output: str, kind: int) -> onnx.NodeProto:
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.INTS: "value_ints",
             onnx.AttributeProto.FLOAT: "value_float"}[kind]
    node = helper.make_node("Constant", [], [output])
    node.attribute.append(onnx.AttributeProto(name=field, ref_attr_name=attribute, type=kind))
    return node


def _function(name: str, inputs: list[str], nodes: list[onnx.NodeProto], attributes: list[str], doc: str) -> onnx.FunctionProto:
    return helper.make_function(RRCOMPILE_DOMAIN, name, inputs, ["Y"], nodes, [helper.make_opsetid("", TARGET_OPSET)],
                                attributes=attributes, doc_string=doc)


def _tile_weight() -> onnx.FunctionProto:
    return _function(TILE_WEIGHT, ["W", "Mask", "Shape"], [
        _attr_constant("axes", "axes", onnx.AttributeProto.INTS),
        helper.make_node("Unsqueeze", ["W", "axes"], ["unsqueezed"]),
        helper.make_node("Mul", ["unsqueezed", "Mask"], ["masked"]),
        helper.make_node("Reshape", ["masked", "Shape"], ["Y"]),
    ], ["axes", "size", "cols"], "T masked copies of a weight, one per row tile, interleaved per output column "
                                 "(size, cols: the tile, for the record)")


def _tile_split(conv: bool) -> onnx.FunctionProto:
    """``[N, M*T, *S] -> [N, M, T, *S]`` (conv) or ``[..., M*T] -> [..., M, T]`` (dense)."""
    nodes = [
        _attr_constant("tiles", "tiles", onnx.AttributeProto.INT),
        helper.make_node("Constant", [], ["zero_axis"], value_ints=[0]),
        helper.make_node("Unsqueeze", ["tiles", "zero_axis"], ["tiles_1"]),
        helper.make_node("Constant", [], ["minus_one"], value_ints=[-1]),
        helper.make_node("Shape", ["P"], ["shape"]),
    ]
    if conv:
        nodes += [helper.make_node("Shape", ["P"], ["batch"], start=0, end=1),
                  helper.make_node("Shape", ["P"], ["spatial"], start=2),
                  helper.make_node("Concat", ["batch", "minus_one", "tiles_1", "spatial"], ["grouped"], axis=0)]
    else:
        nodes += [helper.make_node("Shape", ["P"], ["lead"], start=0, end=-1),
                  helper.make_node("Concat", ["lead", "minus_one", "tiles_1"], ["grouped"], axis=0)]
    nodes.append(helper.make_node("Reshape", ["P", "grouped"], ["Y"]))
    return _function(TILE_SPLIT_CONV if conv else TILE_SPLIT_DENSE, ["P"], nodes, ["tiles"],
                     "the tile axis of a tiled layer's partial sums made explicit, after the column axis")


def _adc(noisy: bool) -> onnx.FunctionProto:
    nodes = [
        _attr_constant("bits", "bits_i", onnx.AttributeProto.INT),
        helper.make_node("Cast", ["bits_i"], ["bits"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Constant", [], ["one"], value_float=1.0),
        helper.make_node("Constant", [], ["two"], value_float=2.0),
        helper.make_node("Constant", [], ["tiny"], value_float=TINY),
        helper.make_node("Sub", ["bits", "one"], ["magnitude_bits"]),
        helper.make_node("Pow", ["two", "magnitude_bits"], ["half_levels"]),
        helper.make_node("Sub", ["half_levels", "one"], ["levels"]),  # L = 2^(bits-1) - 1
        helper.make_node("Neg", ["levels"], ["minus_levels"]),
        helper.make_node("Div", ["R", "levels"], ["raw_step"]),
        helper.make_node("Max", ["raw_step", "tiny"], ["step"]),
    ]
    signal = "G"
    if noisy:
        nodes += [_attr_constant("noise", "noise", onnx.AttributeProto.FLOAT),
                  helper.make_node("Mul", ["R", "noise"], ["std"]),
                  helper.make_node("Mul", ["Z", "std"], ["delta"]),
                  helper.make_node("Add", ["G", "delta"], ["noisy"])]
        signal = "noisy"
    nodes += [
        helper.make_node("Div", [signal, "step"], ["position"]),
        helper.make_node("Round", ["position"], ["rounded"]),
        helper.make_node("Clip", ["rounded", "minus_levels", "levels"], ["level"]),
        helper.make_node("Mul", ["level", "step"], ["Y"]),
    ]
    return _function(ADC_NOISE_OP if noisy else ADC, ["G", "R", "Z"] if noisy else ["G", "R"], nodes,
                     ["bits", "range", "noise"] if noisy else ["bits", "range"],
                     "ADC: partial sums clipped to [-R, R] and quantized to 2^bits - 1 levels"
                     + (", with input-referred noise noise * R * Z" if noisy else "") + " (range: the percentile, for the record)")


FUNCTIONS: dict[str, Callable[[], onnx.FunctionProto]] = {
    TILE_WEIGHT: _tile_weight, TILE_SPLIT_CONV: lambda: _tile_split(True), TILE_SPLIT_DENSE: lambda: _tile_split(False),
    ADC: lambda: _adc(False), ADC_NOISE_OP: lambda: _adc(True),
}


# --- numpy references -----------------------------------------------------------------------------

def tile_weight_reference(w: np.ndarray, mask: np.ndarray, axes: list[int], shape: np.ndarray) -> np.ndarray:
    return (np.expand_dims(w, tuple(axes)) * mask).reshape(tuple(shape))


def tile_split_reference(p: np.ndarray, tiles: int, conv: bool) -> np.ndarray:
    if conv:
        return p.reshape(p.shape[0], -1, tiles, *p.shape[2:])
    return p.reshape(*p.shape[:-1], -1, tiles)


def adc_reference(g: np.ndarray, a: np.ndarray, bits: int, noise: float = 0.0, z: np.ndarray | None = None) -> np.ndarray:
    levels = np.float32(2 ** (bits - 1) - 1)
    step = np.maximum(a / levels, np.float32(TINY))
    if z is not None:
        g = g + z * (a * np.float32(noise))
    return np.clip(np.round(g / step), -levels, levels) * step


# --- torch versions -------------------------------------------------------------------------------

def _adc_torch(g: "torch.Tensor", a: "torch.Tensor", bits: int, noise: float = 0.0,
               z: "torch.Tensor | None" = None) -> "torch.Tensor":
    import torch

    class RoundClip(torch.autograd.Function):
        """Forward: the ADC's levels. Backward: straight through inside ``[-A, A]``, zero outside."""

        @staticmethod
        def forward(ctx, signal, full_scale):
            levels = torch.tensor(float(2 ** (bits - 1) - 1), dtype=signal.dtype, device=signal.device)
            step = torch.clamp_min(full_scale / levels, TINY)
            ctx.save_for_backward(signal, full_scale)
            return torch.clamp(torch.round(signal / step), -levels, levels) * step

        @staticmethod
        def backward(ctx, grad):
            signal, full_scale = ctx.saved_tensors
            return grad * (signal.abs() <= full_scale).to(grad.dtype), None

    if z is not None:
        g = g + z * (a * torch.tensor(noise, dtype=torch.float32))
    return RoundClip.apply(g, a)


def torch_ops() -> dict[str, Callable[[list, dict], list]]:
    """The crossbar functions for the torch executor's op table (keys ``ai.rrcompile:<op>``)."""
    def tile_weight(inputs, attrs):
        w, mask, shape = inputs
        for axis in sorted(attrs["axes"]):
            w = w.unsqueeze(axis)
        return [(w * mask).reshape([int(d) for d in shape])]

    def tile_split(conv: bool):
        def run(inputs, attrs):
            (p,) = inputs
            tiles = attrs["tiles"]
            return [p.reshape(p.shape[0], -1, tiles, *p.shape[2:]) if conv else p.reshape(*p.shape[:-1], -1, tiles)]
        return run

    return {
        f"{RRCOMPILE_DOMAIN}:{TILE_WEIGHT}": tile_weight,
        f"{RRCOMPILE_DOMAIN}:{TILE_SPLIT_CONV}": tile_split(True),
        f"{RRCOMPILE_DOMAIN}:{TILE_SPLIT_DENSE}": tile_split(False),
        f"{RRCOMPILE_DOMAIN}:{ADC}": lambda inputs, attrs: [_adc_torch(inputs[0], inputs[1], attrs["bits"])],
        f"{RRCOMPILE_DOMAIN}:{ADC_NOISE_OP}": lambda inputs, attrs: [
            _adc_torch(inputs[0], inputs[1], attrs["bits"], attrs["noise"], inputs[2])],
    }


# --- the layer rewrite ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tiling:
    """How one layer is tiled: ``size`` rows and ``cols`` columns per array, ``tiles`` row tiles."""

    size: int
    cols: int
    tiles: int
    conv: bool

    @classmethod
    def of(cls, layer: AnalogLayer, tile: Tile | None) -> "Tiling":
        """No tile term: the whole layer is one array (an ADC on its full column outputs)."""
        size = tile.values["size"] if tile else layer.rows
        cols = tile.values["cols"] if tile else layer.cols
        return cls(size, cols, math.ceil(layer.rows / size), layer.op == "Conv")


def _mask(layer: AnalogLayer, node: onnx.NodeProto, tiling: Tiling) -> tuple[np.ndarray, list[int], list[int]]:
    """(mask, Unsqueeze axes, tiled weight shape) of ``TileWeight`` for ``layer``."""
    shape, tiles = layer.weight_shape, tiling.tiles
    row_tile = np.arange(layer.rows) // tiling.size
    onehot = (row_tile[None, :] == np.arange(tiles)[:, None]).astype(np.float32)  # [T, rows]
    if layer.op == "Conv":  # W [M, C, *k]: rows are C x *k; copies on a new axis 1
        return onehot.reshape(1, tiles, *shape[1:]), [1], [shape[0] * tiles, *shape[1:]]
    if len(shape) != 2:
        raise ValueError(f"layer '{layer.node}': tiles need a 2-d weight, not {list(shape)}")
    transposed = layer.op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
    if transposed:  # W [M, K]
        return onehot.reshape(1, tiles, shape[1]), [1], [shape[0] * tiles, shape[1]]
    return onehot.T.reshape(shape[0], 1, tiles), [2], [shape[0], shape[1] * tiles]  # W [K, M]


@dataclasses.dataclass
class TiledLayer:
    """What rewriting one layer adds to the graph."""

    nodes_before: list[onnx.NodeProto]  # between the weight chain and the layer
    nodes_after: list[onnx.NodeProto]  # after the layer, ending in its original output
    initializers: list[onnx.TensorProto]
    inputs: list[onnx.ValueInfoProto]  # the ADC noise input, if any
    functions: set[str]


def tile_layer(node: onnx.NodeProto, layer: AnalogLayer, weight: str, tile: Tile | None, adc: Adc | None,
               adc_range: np.ndarray | None, output_shape: list | None) -> TiledLayer:
    """Rewrite analog ``node`` (in place) to run on tiles and ADCs; ``weight`` is its varied weight tensor.

    ``adc_range`` is the ``[M, T]`` full scale (required with ``adc``); ``output_shape`` the layer's
    output shape where shape inference knows it (the ADC noise input's shape; unknown dims broadcast).
    """
    tiling = Tiling.of(layer, tile)
    name, tiles, cols = layer.node, tiling.tiles, layer.cols
    mask, axes, tiled_shape = _mask(layer, node, tiling)
    inits = [numpy_helper.from_array(mask, f"{name}.tile_mask"),
             numpy_helper.from_array(np.array(tiled_shape, np.int64), f"{name}.tile_shape")]
    before = [helper.make_node(TILE_WEIGHT, [weight, f"{name}.tile_mask", f"{name}.tile_shape"], [f"{name}.tiled_weight"],
                               name=f"{name}.tile_weight", domain=RRCOMPILE_DOMAIN, axes=axes,
                               size=tiling.size, cols=tiling.cols)]
    output = node.output[0]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    node.input[1] = f"{name}.tiled_weight"
    del node.input[2:]
    node.output[0] = f"{name}.partial_sums"
    split = TILE_SPLIT_CONV if tiling.conv else TILE_SPLIT_DENSE
    after = [helper.make_node(split, [f"{name}.partial_sums"], [f"{name}.tile_outputs"], name=f"{name}.tile_split",
                              domain=RRCOMPILE_DOMAIN, tiles=tiles)]
    functions = {TILE_WEIGHT, split}
    inputs = []
    converted = f"{name}.tile_outputs"
    spatial = 0 if not tiling.conv else len(layer.weight_shape) - 2
    if adc is not None:
        if adc_range is None or adc_range.shape != (cols, tiles):
            raise ValueError(f"layer '{name}': ADC range of shape {None if adc_range is None else adc_range.shape}, "
                             f"expected {(cols, tiles)}")
        inits.append(numpy_helper.from_array(adc_range.astype(np.float32).reshape(cols, tiles, *[1] * spatial),
                                             f"{name}{ADC_RANGE_SUFFIX}"))
        attrs = {"bits": adc.values["bits"], "range": float(adc.values["range"])}
        adc_inputs = [converted, f"{name}{ADC_RANGE_SUFFIX}"]
        op = ADC
        if adc.random:
            op, attrs["noise"] = ADC_NOISE_OP, float(adc.values["noise"])
            adc_inputs.append(f"{name}.adc_noise")
            inputs.append(helper.make_tensor_value_info(f"{name}.adc_noise", onnx.TensorProto.FLOAT,
                                                        _noise_shape(output_shape, cols, tiles, tiling.conv, spatial)))
        after.append(helper.make_node(op, adc_inputs, [f"{name}.adc"], name=f"{name}.adc", domain=RRCOMPILE_DOMAIN, **attrs))
        functions.add(op)
        converted = f"{name}.adc"
    tile_axis = 2 if tiling.conv else -1
    inits.append(numpy_helper.from_array(np.array([tile_axis], np.int64), f"{name}.tile_axis"))
    summed = f"{name}.accumulated" if bias else output
    after.append(helper.make_node("ReduceSum", [converted, f"{name}.tile_axis"], [summed], name=f"{name}.tile_sum",
                                  keepdims=0))
    if bias:
        if tiling.conv:  # [M] -> [M, 1, ...]
            inits.append(numpy_helper.from_array(np.arange(1, spatial + 1, dtype=np.int64), f"{name}.bias_axes"))
            after.append(helper.make_node("Unsqueeze", [bias, f"{name}.bias_axes"], [f"{name}.bias_column"],
                                          name=f"{name}.bias_shape"))
            bias_term = f"{name}.bias_column"
        else:
            beta = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
            bias_term = bias
            if beta != 1.0:
                inits.append(numpy_helper.from_array(np.array(beta, np.float32), f"{name}.beta"))
                after.append(helper.make_node("Mul", [bias, f"{name}.beta"], [f"{name}.bias_scaled"], name=f"{name}.bias_shape"))
                bias_term = f"{name}.bias_scaled"
        after.append(helper.make_node("Add", [summed, bias_term], [output], name=f"{name}.bias"))
    return TiledLayer(before, after, inits, inputs, functions)


def layer_torch(node: onnx.NodeProto, layer: AnalogLayer, attrs: dict, run: Callable, x: "torch.Tensor",
                weight: "torch.Tensor", bias: "torch.Tensor | None", tile: Tile | None, adc: Adc | None,
                adc_range: np.ndarray | None, draw: Callable[[tuple[int, ...]], "torch.Tensor"] | None = None,
                ) -> "torch.Tensor":
    """The output of analog ``node`` (untiled, as in the model) on its crossbar, in torch: what
    :func:`tile_layer`'s rewrite computes, for a chip that runs one layer at a time (calibration's
    :class:`~rrcompile.calibrate.SimulatedChip`). ``run(x, w)`` is the layer's op without its bias;
    ``draw(shape)`` gives the ADC noise (standard normal, one image's converted partial sums)."""
    import torch

    ops = torch_ops()
    tiling = Tiling.of(layer, tile)
    mask, axes, shape = _mask(layer, node, tiling)
    tiled = ops[f"{RRCOMPILE_DOMAIN}:{TILE_WEIGHT}"]([weight, torch.from_numpy(mask), shape], {"axes": axes})[0]
    split = TILE_SPLIT_CONV if tiling.conv else TILE_SPLIT_DENSE
    g = ops[f"{RRCOMPILE_DOMAIN}:{split}"]([run(x, tiled)], {"tiles": tiling.tiles})[0]
    spatial = g.dim() - 3 if tiling.conv else 0
    if adc is not None:
        full_scale = torch.from_numpy(np.array(adc_range, np.float32).reshape(*adc_range.shape, *[1] * spatial))
        z = draw(tuple(g.shape[1:])) if adc.random else None
        g = _adc_torch(g, full_scale, adc.values["bits"], adc.values["noise"], z)
    y = g.sum(dim=2 if tiling.conv else -1)
    if bias is None:
        return y
    return y + (bias.reshape(-1, *[1] * spatial) if tiling.conv else attrs.get("beta", 1.0) * bias)


def _noise_shape(output_shape: list | None, cols: int, tiles: int, conv: bool, spatial: int) -> list[int]:
    """The ADC noise input: one draw per column, tile and output position, shared over the batch."""
    known = [d if isinstance(d, int) and d > 0 else 1 for d in (output_shape or [])]
    if conv:
        rest = known[2:] if len(known) == spatial + 2 else [1] * spatial
        return [cols, tiles, *rest]
    middle = known[1:-1] if output_shape else []
    return [*middle, cols, tiles]


def tiled_outputs(model: onnx.ModelProto) -> dict[str, str]:
    """Each tiled layer's output tensor (after the sum over tiles and the bias) -> the analog node's name:
    a tiled analog node writes only its partial sums."""
    names = {n.name: n for n in model.graph.node}
    return {(names.get(f"{name}.bias") or names[f"{name}.tile_sum"]).output[0]: name
            for name in names if f"{name}.tile_weight" in names}


def untile(model: onnx.ModelProto) -> bool:
    """Undo :func:`tile_layer` on every tiled layer of ``model`` (in place): each analog node reads
    its weight and bias and writes its output again; the crossbar nodes, their initializers and
    the ADC noise inputs go. Returns whether anything changed."""
    by_name = {n.name: n for n in model.graph.node}
    tiled = [n for n in model.graph.node if len(n.input) > 1 and n.input[1].endswith(".tiled_weight")
             and f"{n.name}.tile_weight" in by_name]
    if not tiled:
        return False
    drop_nodes, drop_inits, drop_inputs = set(), set(), set()
    for node in tiled:
        name = node.name
        weight = by_name[f"{name}.tile_weight"].input[0]
        bias_node, bias_shape = by_name.get(f"{name}.bias"), by_name.get(f"{name}.bias_shape")
        output = (bias_node or by_name[f"{name}.tile_sum"]).output[0]
        bias = bias_shape.input[0] if bias_shape is not None else bias_node.input[1] if bias_node is not None else None
        node.input[1] = weight
        if bias:
            node.input.append(bias)
        node.output[0] = output
        drop_nodes |= {f"{name}.{part}" for part in ("tile_weight", "tile_split", "adc", "tile_sum", "bias_shape", "bias")}
        drop_inits |= {f"{name}.{part}" for part in ("tile_mask", "tile_shape", "adc_range", "tile_axis", "bias_axes", "beta")}
        drop_inputs.add(f"{name}.adc_noise")
    kept = [n for n in model.graph.node if n.name not in drop_nodes]
    del model.graph.node[:]
    model.graph.node.extend(kept)
    for field, names in ((model.graph.initializer, drop_inits), (model.graph.input, drop_inputs)):
        kept = [item for item in field if item.name not in names]
        del field[:]
        field.extend(kept)
    produced = {out for n in model.graph.node for out in n.output}
    kept_info = [vi for vi in model.graph.value_info if vi.name in produced]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept_info)
    remove_unused_functions(model)  # tiling the layers again adds the crossbar functions again
    return True


# --- the ADC ranges ---------------------------------------------------------------------------------

def needs_adc_ranges(device: DeviceConfig) -> bool:
    """Whether ``device`` has an ADC term and no ADC ranges fixed yet."""
    return not device.adc_ranges and any(crossbar_models(stack)[1] is not None for stack in device.stacks())


def adc_range_shapes(model: onnx.ModelProto, device: DeviceConfig) -> dict[str, tuple[int, int]]:
    """The ``[M, T]`` shape of every ADC range ``device`` needs on ``model`` (by node name)."""
    shapes = {}
    for layer in analog_layers(model):
        tile, adc = crossbar_models(device.for_layer(layer.node, layer.weight))
        if adc is not None:
            shapes[layer.node] = (layer.cols, Tiling.of(layer, tile).tiles)
    return shapes


def with_adc_ranges(model: onnx.ModelProto, device: DeviceConfig, x: np.ndarray | None) -> DeviceConfig:
    """``device`` with its ADC ranges fixed for ``model`` on training images ``x`` (:func:`adc_ranges`),
    or as it is when it needs none or carries them already (a compiled model's: they stay what
    the compile fixed)."""
    if not needs_adc_ranges(device):
        return device
    if x is None:
        raise DeviceSpecError("device 'adc': its ranges are fixed from training images, and none were given")
    return dataclasses.replace(device, adc_ranges=adc_ranges(model, device, x))


def adc_ranges(model: onnx.ModelProto, device: DeviceConfig, x: np.ndarray, *, batch_size: int = 64) -> dict[str, np.ndarray]:
    """The ADC full scale of every layer with an ADC term (by node name, ``[M, T]``): per tile and
    column block, the ``range``-th percentile of ``|P_t|``, the clean network's partial sums on
    images ``x`` (prepared for the model's input; the training images, never the test set)."""
    import onnxruntime as ort

    from rrcompile.graph import model_io
    from rrcompile.passes.insert_variation import InsertVariationPass

    wanted: dict[str, tuple[Adc, Tiling]] = {}
    probe_layers = {}
    for layer in analog_layers(model):
        tile, adc = crossbar_models(device.for_layer(layer.node, layer.weight))
        if adc is None:
            continue
        tiling = Tiling.of(layer, tile)
        wanted[layer.node] = (adc, tiling)
        probe_layers[layer.node] = [Tile(size=tiling.size, cols=tiling.cols)]
    if not wanted:
        return {}
    probe = InsertVariationPass(DeviceConfig([], probe_layers))(model).model  # tiles, no ADC, no variation
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_tensor_value_info(f"{layer}.tile_outputs", onnx.TensorProto.FLOAT, None)
                              for layer in wanted)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = model_io(probe)[0]
    collected: dict[str, list[np.ndarray]] = {layer: [] for layer in wanted}
    for start in range(0, len(x), batch_size):
        for layer, g in zip(wanted, session.run(None, {input_name: x[start:start + batch_size]})):
            _, tiling = wanted[layer]
            # [M, T, everything else]
            g = np.moveaxis(g, (1, 2), (0, 1)) if tiling.conv else np.moveaxis(g, (-2, -1), (0, 1))
            collected[layer].append(np.abs(g).reshape(g.shape[0], g.shape[1], -1))
    ranges = {}
    for layer, (adc, tiling) in wanted.items():
        values = np.concatenate(collected[layer], axis=2)
        cols, tiles = values.shape[:2]
        result = np.empty((cols, tiles), np.float32)
        for first in range(0, cols, tiling.cols):
            block = values[first:first + tiling.cols].transpose(1, 0, 2).reshape(tiles, -1)
            result[first:first + tiling.cols] = np.percentile(block, adc.values["range"], axis=1).astype(np.float32)
        ranges[layer] = result
    return ranges


def layer_output_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Each analog layer's output shape, where shape inference knows it (by node name)."""
    shapes = tensor_shapes(model)
    outputs = {n.name: n.output[0] for n in model.graph.node}
    return {layer.node: shapes.get(outputs[layer.node]) for layer in analog_layers(model)}
