"""InsertCompensationCandidatesPass: give every analog layer a switchable compensation candidate.

Rules:
1. Requires a canonical model (target opset) with at least one analog layer and no compensation
   yet; the model may already be varied (InsertVariationPass composes in either order).
2. Each analog layer (Conv; Gemm with transA = 0; MatMul with a 2-D weight) gets one ``ai.rrcompile``
   candidate node ``<layer>.compensation`` right after it (``rrcompile.compensation``). The layer
   writes ``<layer>.analog_output`` and the candidate the layer's original output name, so
   consumers and graph outputs are untouched. The candidate reads the layer's data input, never
   its (possibly varied) weight: compensation is digital.
3. Weights are initializers ``<layer>.compensation_down`` (N(0, 1/fan_in) from
   ``numpy.random.default_rng([seed, layer index])``) and ``<layer>.compensation_up`` (zeros, so
   inserting candidates changes no output), of rank ``ranks[layer]``, else ``rank``, else
   ``rank_for_budget(budget)``; a layer whose rank in ``ranks`` is 0 gets no candidate, or with
   ``calibrated`` a gain and offset only (``ConvGainOffset`` / ``DenseGainOffset``).
   With ``calibrated`` the candidate is the calibratable form (``ConvCalibration``,
   ``DenseCalibration``) with a per-column ``<layer>.compensation_gain`` (ones) and
   ``<layer>.compensation_offset`` (zeros), which again change no output.
4. ``<layer>.compensation_gate`` is a float32 scalar initializer (1.0) that is also a graph input:
   feeding 0 switches that candidate off without rebuilding the graph.
5. A conv candidate copies the layer's strides, pads and dilations; ``auto_pad`` becomes explicit
   pads from the inferred input shape. A layer is skipped, with a warning that says why, when its
   shape is unknown under ``auto_pad``, its conv is grouped, its Gemm has transA = 1, its MatMul
   weight is not 2-D, or its weight is not float32; with ``calibrated`` also a 3-d convolution.
6. The functions used are added once to ``model.functions``, ``ai.rrcompile`` to the opset
   imports if missing; the result passes the full ONNX check.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rrcompile.compensation import (
    Compensation, ConvCompensation, DenseCompensation, calibration_kind, is_compensation, rank_for_budget,
)
from rrcompile.devices import FUNCTION_OPSET
from rrcompile.errors import UnsupportedModelError
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, analog_layers, default_opset, tensor_shapes
from rrcompile.pass_manager import Pass, PassResult


class InsertCompensationCandidatesPass(Pass):
    in_place = True

    def __init__(self, budget: float = 0.05, rank: int | None = None, seed: int = 0, *,
                 ranks: Mapping[str, int] | None = None, calibrated: bool = False):
        if rank is not None and rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if ranks and min(ranks.values()) < 0:
            raise ValueError(f"ranks must be >= 0, got {dict(ranks)}")
        self.budget = budget
        self.rank = rank
        self.ranks = dict(ranks or {})
        self.seed = seed
        self.calibrated = calibrated

    def requires(self, model: onnx.ModelProto) -> None:
        if default_opset(model) != TARGET_OPSET:
            raise self.fail(f"expects a canonical model at opset {TARGET_OPSET}; run CanonicalizePass first")
        if any(is_compensation(n) for n in model.graph.node):
            raise self.fail("the model already contains compensation candidates")
        if not analog_layers(model):
            raise UnsupportedModelError("no analog layer (Conv, Gemm or MatMul with a constant weight) in the model")

    def ensures(self, model: onnx.ModelProto) -> None:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise self.fail(f"compensated model fails the ONNX checker: {str(exc).splitlines()[0]}") from None

    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(model)
        inits = {t.name: t for t in model.graph.initializer}
        layers = {layer.node: (index, layer) for index, layer in enumerate(analog_layers(model))}
        nodes: list[onnx.NodeProto] = []
        used: dict[str, type[Compensation]] = {}
        for node in model.graph.node:
            nodes.append(node)
            if node.name not in layers:
                continue
            index, layer = layers[node.name]
            rank = self.ranks.get(layer.node, self.rank or rank_for_budget(layer, self.budget))
            if rank == 0 and not self.calibrated:
                continue
            skip, conv_attrs = self._skip_reason(node, layer, inits[layer.weight]), {}
            if skip is None and self.calibrated and layer.op == "Conv" and len(layer.weight_shape) not in (3, 4):
                skip = f"a {len(layer.weight_shape) - 2}-d convolution: calibration fits 1-d and 2-d ones"
            if skip is None and layer.op == "Conv":
                conv_attrs, skip = self._conv_attrs(node, layer, shapes)
            if skip:
                warnings.warn(f"{self.name}: layer '{layer.node}' gets no compensation candidate: {skip}")
                continue
            if self.calibrated:
                kind = calibration_kind(layer.op, rank)
            else:
                kind = ConvCompensation if layer.op == "Conv" else DenseCompensation
            values = [*self._weights(kind, layer, rank, index), np.array(1.0, np.float32)]
            parts = ["down", "up", "gate"]
            if kind.calibrated:
                column = kind.column_shape(layer.cols, len(layer.weight_shape))
                values += [np.ones(column, np.float32), np.zeros(column, np.float32)]
                parts += ["gain", "offset"]
            names = [f"{layer.node}.compensation_{part}" for part in parts]
            model.graph.initializer.extend(numpy_helper.from_array(value, name) for value, name in zip(values, names))
            model.graph.input.append(helper.make_tensor_value_info(names[2], onnx.TensorProto.FLOAT, []))
            output = node.output[0]
            node.output[0] = f"{layer.node}.analog_output"
            nodes.append(helper.make_node(kind.op_type, [node.output[0], node.input[0], *names], [output],
                                          name=f"{layer.node}.compensation", domain=RRCOMPILE_DOMAIN, **conv_attrs))
            used[kind.op_type] = kind
        if not used:
            return PassResult(model, False)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        present = {(f.domain, f.name) for f in model.functions}
        model.functions.extend(kind.function_proto() for kind in used.values() if (RRCOMPILE_DOMAIN, kind.op_type) not in present)
        if not any(o.domain == RRCOMPILE_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(RRCOMPILE_DOMAIN, FUNCTION_OPSET))
        return PassResult(model, True)

    @staticmethod
    def _skip_reason(node: onnx.NodeProto, layer: AnalogLayer, weight: onnx.TensorProto) -> str | None:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if weight.data_type != onnx.TensorProto.FLOAT:
            return f"weight '{layer.weight}' is {onnx.TensorProto.DataType.Name(weight.data_type)}, not FLOAT"
        if layer.op == "Conv" and attrs.get("group", 1) != 1:
            return f"grouped convolution (group={attrs['group']}); compensation is defined for group 1"
        if layer.op == "Gemm" and attrs.get("transA", 0):
            return "Gemm with transA=1 takes its input transposed"
        if layer.op == "MatMul" and len(layer.weight_shape) != 2:
            return f"MatMul weight of shape {list(layer.weight_shape)} is not a matrix"
        return None

    @staticmethod
    def _conv_attrs(node: onnx.NodeProto, layer: AnalogLayer, shapes: dict) -> tuple[dict[str, list[int]], str | None]:
        """(strides, pads, dilations) of a Conv with explicit pads, or a reason they cannot be known."""
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = layer.weight_shape[2:]
        spatial = len(kernel)
        strides = list(attrs.get("strides", [1] * spatial))
        dilations = list(attrs.get("dilations", [1] * spatial))
        auto_pad = attrs.get("auto_pad", b"NOTSET").decode()
        if auto_pad == "NOTSET":
            pads = list(attrs.get("pads", [0] * 2 * spatial))
        elif auto_pad == "VALID":
            pads = [0] * 2 * spatial
        else:
            size = shapes.get(node.input[0], [])[2:]
            if len(size) != spatial or not all(isinstance(d, int) and d > 0 for d in size):
                return {}, f"auto_pad={auto_pad} needs the input's spatial shape, which shape inference left unknown"
            # ONNX: output = ceil(input / stride), the odd pixel of padding at the end for SAME_UPPER
            total = [max(0, (math.ceil(n / s) - 1) * s + (k - 1) * d + 1 - n) for n, s, k, d in zip(size, strides, kernel, dilations)]
            late = [t - t // 2 if auto_pad == "SAME_UPPER" else t // 2 for t in total]
            pads = [t - e for t, e in zip(total, late)] + late
        return {"strides": strides, "pads": pads, "dilations": dilations}, None

    def _weights(self, kind: type[Compensation], layer: AnalogLayer, rank: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Down weight drawn N(0, 1/fan_in) so the branch starts at the layer's scale; up weight zero."""
        rng = np.random.default_rng([self.seed, index])
        if issubclass(kind, ConvCompensation):
            out_channels, *fan_in_dims = layer.weight_shape
            down_shape, up_shape = (rank, *fan_in_dims), (out_channels, rank) + (1,) * (len(fan_in_dims) - 1)
        else:  # rows and cols are in and out features whatever the weight's layout (Gemm transB)
            down_shape, up_shape = (layer.rows, rank), (rank, layer.cols)
        fan_in = math.prod(down_shape[1:]) if issubclass(kind, ConvCompensation) else down_shape[0]
        down = (rng.standard_normal(down_shape) / math.sqrt(fan_in)).astype(np.float32)
        return down, np.zeros(up_shape, np.float32)
