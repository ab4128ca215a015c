"""InsertVariationPass: route every analog layer's weight through its device models.

Rules:
1. Requires a canonical model (target opset) with at least one analog layer, not yet varied; it
   may already carry compensation candidates (they read the layer's input, not its weight).
2. For each analog layer with a non-empty device stack (``DeviceConfig.for_layer``), the weight
   input is replaced by a chain of ``ai.rrcompile`` function calls in physical order
   (quantize -> lognormal -> programming -> stuck -> read), each named ``<layer>.<kind>``.
3. Models that scale with the layer's range read ``<layer>.weight_range = ReduceMax(Abs(W))``,
   computed once from the programmed weight so that every effect uses the same range.
4. Each stochastic model reads a new float32 graph input ``<layer>.<kind>_noise`` shaped like the
   weight; the evaluator feeds it (standard normal or uniform), so one feed is one chip.
5. A noise input's shape is the model's ``noise_shape`` of the weight (``[2, *W.shape]`` for a
   differential pair, else the weight's).
6. A layer with a ``tile`` or ``adc`` term is rewritten to compute per tile
   (:func:`rrcompile.crossbar.tile_layer`): ``TileWeight`` after the weight chain, the analog node
   computing every tile's partial sums, ``TileSplit*``, the ADC function (reading the initializer
   ``<layer>.adc_range`` from ``adc_ranges``, else from the device's, and with ADC noise the graph input
   ``<layer>.adc_noise``, drawn per inference), ``ReduceSum`` over tiles, then the digital bias.
   An ADC without its ranges is refused.
7. Every function used is added once to ``model.functions`` and ``ai.rrcompile`` to the opset
   imports if missing, so stock onnxruntime runs the graph.
With every model switched off (sigma = eta = p = 0) the outputs equal the input graph's exactly;
with tiles, to float summation order.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
from onnx import helper

from rrcompile.crossbar import FUNCTIONS, is_crossbar, layer_output_shapes, tile_layer
from rrcompile.devices import FUNCTION_OPSET, DeviceConfig, DeviceModel, crossbar_models, is_variation, weight_models
from rrcompile.errors import UnsupportedModelError
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, analog_layers, default_opset
from rrcompile.pass_manager import Pass, PassResult


class InsertVariationPass(Pass):
    in_place = True

    def __init__(self, device: DeviceConfig, adc_ranges: Mapping[str, np.ndarray] | None = None):
        self.device = device
        self.adc_ranges = {**device.adc_ranges, **(adc_ranges or {})}  # the ranges given override the device's

    def requires(self, model: onnx.ModelProto) -> None:
        if default_opset(model) != TARGET_OPSET:
            raise self.fail(f"expects a canonical model at opset {TARGET_OPSET}; run CanonicalizePass first")
        if any(is_variation(n) or is_crossbar(n) for n in model.graph.node):
            raise self.fail("the model already contains ai.rrcompile variation or crossbar ops")
        if not analog_layers(model):
            raise UnsupportedModelError("no analog layer (Conv, Gemm or MatMul with a constant weight) in the model")

    def call(self, model: onnx.ModelProto) -> PassResult:
        layers = {layer.node: layer for layer in analog_layers(model)}
        dtypes = {t.name: t.data_type for t in model.graph.initializer}
        output_shapes = layer_output_shapes(model) if self.device.crossbar else {}
        nodes: list[onnx.NodeProto] = []
        used: dict[str, type[DeviceModel]] = {}
        crossbar_functions: set[str] = set()
        for node in model.graph.node:
            layer = layers.get(node.name)
            stack = self.device.for_layer(layer.node, layer.weight) if layer else []
            effects, (tile, adc) = weight_models(stack), crossbar_models(stack)
            after: list[onnx.NodeProto] = []
            if effects:
                chain, noise_inputs, varied = self._chain(layer, effects)
                nodes.extend(chain)
                model.graph.input.extend(
                    helper.make_tensor_value_info(name, dtypes[layer.weight], shape) for name, shape in noise_inputs
                )
                node.input[1] = varied
                used.update((m.op_type, type(m)) for m in effects)
            if tile or adc:
                if adc is not None and layer.node not in self.adc_ranges:
                    raise self.fail(f"layer '{layer.node}' has an ADC but no ADC ranges: fix them from training images "
                                    f"first (rrcompile.crossbar.adc_ranges)")
                try:
                    tiled = tile_layer(node, layer, node.input[1], tile, adc, self.adc_ranges.get(layer.node),
                                       output_shapes.get(layer.node))
                except ValueError as exc:
                    raise self.fail(str(exc)) from None
                nodes.extend(tiled.nodes_before)
                after = tiled.nodes_after
                model.graph.initializer.extend(tiled.initializers)
                model.graph.input.extend(tiled.inputs)
                crossbar_functions |= tiled.functions
            nodes.append(node)
            nodes.extend(after)
        if not used and not crossbar_functions:
            return PassResult(model, False)
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        model.functions.extend(cls.function_proto() for cls in used.values())
        model.functions.extend(FUNCTIONS[name]() for name in sorted(crossbar_functions))
        if not any(o.domain == RRCOMPILE_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(RRCOMPILE_DOMAIN, FUNCTION_OPSET))
        return PassResult(model, True)

    @staticmethod
    def _chain(layer: AnalogLayer, stack: list[DeviceModel]) -> tuple[list[onnx.NodeProto], list[tuple[str, tuple[int, ...]]], str]:
        nodes, noise_inputs = [], []
        weight_range = f"{layer.node}.weight_range"
        if any(m.reads_range() for m in stack):
            nodes += [
                helper.make_node("Abs", [layer.weight], [f"{layer.node}.weight_abs"], name=f"{layer.node}.weight_abs"),
                helper.make_node("ReduceMax", [f"{layer.node}.weight_abs"], [weight_range], name=weight_range, keepdims=0),
            ]
        current = layer.weight
        for model in stack:
            inputs = [current, weight_range] if model.reads_range() else [current]
            if model.noise is not None:
                noise_name = f"{layer.node}.{model.kind}_noise"
                inputs.append(noise_name)
                noise_inputs.append((noise_name, model.noise_shape(layer.weight_shape)))
            output = f"{layer.node}.{model.kind}"
            nodes.append(helper.make_node(model.op_type, inputs, [output], name=output, domain=RRCOMPILE_DOMAIN, **model.values))
            current = output
        return nodes, noise_inputs, current
