"""The graph layer: onnx-graphsurgeon round trips, analog layers, and the networkx view.

An *analog layer* is a Conv, Gemm or MatMul whose weight is a constant initializer: those are the
matrix-vector products a crossbar executes, so they are the only places where weights vary. In a
varied model the weight reaches the layer through a chain of ``ai.rrcompile`` ops that starts at
that initializer, and the layer is still analog.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Collection, Mapping

import networkx as nx
import numpy as np
import onnx
import onnx.helper
import onnx.numpy_helper
import onnx_graphsurgeon as gs

from rrcompile.errors import UnsupportedModelError

TARGET_OPSET = 17
TARGET_IR_VERSION = 8  # the IR version that introduced opset 17
RRCOMPILE_DOMAIN = "ai.rrcompile"
ANALOG_OPS = ("Conv", "Gemm", "MatMul")
DEFAULT_DOMAINS = ("", "ai.onnx")  # two spellings of the standard ONNX operator set


def set_library_logging(*, verbose: bool = False) -> None:
    """onnx-graphsurgeon's warnings (constant-folding size notes, a nag about the 'colored' module)
    concern rrcompile's own graph rewriting, not the user's model: shown only when asked for."""
    gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.WARNING if verbose else gs.logger.G_LOGGER.ERROR
    gs.logger.G_LOGGER.colors = False


set_library_logging()


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """``model`` as a graphsurgeon graph; ``model`` itself stays as it was.

    graphsurgeon writes into the model it imports (it names the tensor of every Constant node),
    so it imports a copy: a pass that builds a new model must leave its input alone.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return gs.import_onnx(copy)


def export_graph(graph: gs.Graph, like: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping the model-level fields of ``like`` that graphsurgeon drops."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    model.ir_version = like.ir_version
    model.producer_name = like.producer_name or model.producer_name
    model.producer_version = like.producer_version or model.producer_version
    model.model_version = like.model_version
    model.doc_string = like.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(like.metadata_props)
    return model


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of ``tensor`` if it is an initializer or the output of a Constant node."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attrs = tensor.inputs[0].attrs
        if isinstance(attrs.get("value"), gs.Constant):
            return attrs["value"].values
    return None


def is_default_domain(item: onnx.NodeProto | onnx.OperatorSetIdProto) -> bool:
    """Whether a node, or an opset import, belongs to the standard ONNX domain."""
    return item.domain in DEFAULT_DOMAINS


def default_opset(model: onnx.ModelProto) -> int:
    """The version of the standard ONNX domain that ``model`` imports (1 if it imports none)."""
    return next((o.version for o in model.opset_import if is_default_domain(o)), 1)


def is_analog_op(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a Conv, Gemm or MatMul that could be an analog layer (weight permitting)."""
    return node.op_type in ANALOG_OPS and is_default_domain(node) and len(node.input) >= 2


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """Tensor name -> the node that writes it."""
    return {out: node for node in model.graph.node for out in node.output}


def variation_chain(tensor: str, producer: Mapping[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The ``ai.rrcompile`` ops a layer's weight input ``tensor`` comes through, from the layer back
    to the weight: the last one reads the target initializer as its first input; empty if unvaried.

    Each op of a variation chain takes the weight it varies as its first input. Only variation ops
    write a weight (compensation reads a layer's data and writes its output), so the domain tells
    them apart here, which keeps this module below the device registry (``devices.is_variation``).
    """
    chain = []
    while tensor in producer and producer[tensor].domain == RRCOMPILE_DOMAIN:
        chain.append(producer[tensor])
        tensor = producer[tensor].input[0]
    return chain


def model_io(model: onnx.ModelProto, *, ignore: Collection[str] = ()) -> tuple[str, list[int | str]]:
    """Name and shape of a classifier's single data input.

    An input backed by an initializer (a compensation gate) has a default value, so it is not data;
    nor is an input named in ``ignore`` (a varied model's noise inputs, for a caller that feeds them).
    """
    inits = {t.name for t in model.graph.initializer}
    data = [i for i in model.graph.input if i.name not in inits and i.name not in ignore]
    if len(data) != 1:
        names = ", ".join(i.name for i in data)
        raise UnsupportedModelError(f"expected one data input, found {len(data)} ({names})")
    vi = data[0]
    return vi.name, [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]


def only_consumer(tensor: gs.Tensor, graph: gs.Graph) -> gs.Node | None:
    """The single node reading ``tensor``, or None if it has several readers or is a graph output."""
    if len(tensor.outputs) != 1 or tensor in graph.outputs:
        return None
    return tensor.outputs[0]


@dataclasses.dataclass(frozen=True)
class AnalogLayer:
    node: str  # node name
    op: str
    weight: str  # initializer name
    bias: str | None
    weight_shape: tuple[int, ...]
    rows: int  # crossbar rows = input features (fan-in per output)
    cols: int  # crossbar columns = output features

    @property
    def params(self) -> int:
        return int(np.prod(self.weight_shape))

    def tiles(self, tile: int) -> int:
        """Crossbar tiles of ``tile`` x ``tile`` cells needed to hold the weight matrix."""
        return math.ceil(self.rows / tile) * math.ceil(self.cols / tile)


def analog_layers(model: onnx.ModelProto) -> list[AnalogLayer]:
    """Every analog layer in graph order; ``weight`` is the target initializer, also in a varied model."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = producers(model)
    layers = []
    for node in model.graph.node:
        if not is_analog_op(node):
            continue
        chain = variation_chain(node.input[1], producer)
        weight = chain[-1].input[0] if chain else node.input[1]
        if weight not in inits:
            continue
        shape = tuple(inits[weight].dims)
        if node.op_type == "Conv":
            rows, cols = int(np.prod(shape[1:])), shape[0]
        elif node.op_type == "Gemm" and _int_attr(node, "transB"):
            rows, cols = shape[1], shape[0]
        else:
            rows, cols = shape[0], int(np.prod(shape[1:]))
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        layers.append(AnalogLayer(node.name, node.op_type, weight, bias, shape, rows, cols))
    return layers


def with_initializers(model: onnx.ModelProto, values: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers named in ``values`` hold those values, each in the
    initializer's own dtype and shape (trained weights, a chip's calibration)."""
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    unknown = set(values) - {t.name for t in copy.graph.initializer}
    if unknown:
        raise UnsupportedModelError(f"no initializer named {', '.join(sorted(unknown))} in the model")
    for initializer in copy.graph.initializer:
        if initializer.name in values:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type)
            value = np.asarray(values[initializer.name]).astype(dtype).reshape(tuple(initializer.dims))
            initializer.CopyFrom(onnx.numpy_helper.from_array(value, initializer.name))
    return copy


def keep_where(field, predicate: Callable[[Any], bool]) -> None:
    """Keep only the items of a repeated protobuf ``field`` (nodes, inputs, ...) that satisfy ``predicate``."""
    kept = [item for item in field if predicate(item)]
    del field[:]
    field.extend(kept)


def remove_unused_functions(model: onnx.ModelProto) -> None:
    """Drop model-local functions no node calls, and the ``ai.rrcompile`` import once nothing uses it."""
    called = {(n.domain, n.op_type) for n in model.graph.node}
    keep_where(model.functions, lambda f: (f.domain, f.name) in called)
    if not any(domain == RRCOMPILE_DOMAIN for domain, _ in called):
        keep_where(model.opset_import, lambda o: o.domain != RRCOMPILE_DOMAIN)


def _int_attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list[int | str]]:
    """Shapes of every tensor that shape inference can resolve (symbolic dims kept as names)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = [d.dim_param if d.dim_param else d.dim_value for d in vi.type.tensor_type.shape.dim]
    for t in inferred.graph.initializer:
        shapes[t.name] = list(t.dims)
    return shapes


def macs_per_sample(model: onnx.ModelProto, layer: AnalogLayer, shapes: dict) -> int | None:
    """Multiply-accumulates of one analog layer for one input sample (batch dim excluded)."""
    node = next(n for n in model.graph.node if n.name == layer.node)
    out_shape = shapes.get(node.output[0])
    if out_shape is None or not all(isinstance(d, int) and d > 0 for d in out_shape[1:]):
        return None
    return int(np.prod(out_shape[1:])) * layer.rows


def to_networkx(model: onnx.ModelProto) -> nx.DiGraph:
    """A DiGraph with one vertex per ONNX node (keyed by node name) and an edge per tensor link.

    Vertex attributes: ``op``, ``analog`` (bool), and for analog layers ``weight``, ``weight_shape``,
    ``params``, ``macs`` (per sample), ``crossbar`` (rows, cols); every vertex has ``depth``
    (longest path from the graph inputs, in nodes) and ``analog_depth`` (analog layers on that
    path, this one included). Edge attribute ``tensor`` names the linking tensor.
    """
    shapes = tensor_shapes(model)
    layers = {layer.node: layer for layer in analog_layers(model)}
    view = nx.DiGraph(name=model.graph.name)
    producer: dict[str, str] = {}
    for node in model.graph.node:
        attrs = {"op": node.op_type, "domain": node.domain, "analog": node.name in layers}
        if node.name in layers:
            layer = layers[node.name]
            attrs.update(
                weight=layer.weight,
                weight_shape=layer.weight_shape,
                params=layer.params,
                macs=macs_per_sample(model, layer, shapes),
                crossbar=(layer.rows, layer.cols),
            )
        view.add_node(node.name, **attrs)
        for out in node.output:
            producer[out] = node.name
    for node in model.graph.node:
        for inp in node.input:
            if inp in producer:
                view.add_edge(producer[inp], node.name, tensor=inp)
    for name in nx.topological_sort(view):
        preds = list(view.predecessors(name))
        view.nodes[name]["depth"] = 1 + max((view.nodes[p]["depth"] for p in preds), default=-1)
        view.nodes[name]["analog_depth"] = int(view.nodes[name]["analog"]) + max(
            (view.nodes[p]["analog_depth"] for p in preds), default=0
        )
    return view


def unique_name(graph: gs.Graph, base: str) -> str:
    """``base``, or ``base_<k>`` for the first k that names no tensor in ``graph``."""
    taken = graph.tensors().keys()
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def writable_constant(graph: gs.Graph, tensor: gs.Constant, reader: gs.Node, base: str) -> gs.Constant:
    """A constant holding ``tensor``'s values that only ``reader`` uses, so it may be rewritten.

    The tensor itself when ``reader`` is its only user (so its name survives), else a fresh copy.
    """
    if all(user is reader for user in tensor.outputs):
        return tensor
    return gs.Constant(unique_name(graph, base), np.array(tensor.values))


def per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | None:
    """``value`` as a length-``channels`` vector if it broadcasts along axis 1 of a rank-``rank`` tensor only."""
    target = (1, channels) + (1,) * (rank - 2)
    try:
        if np.broadcast_shapes(value.shape, target) != target:
            return None
    except ValueError:
        return None
    return np.broadcast_to(value, target).reshape(channels)
