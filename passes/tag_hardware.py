"""TagHardwarePass: record on every node where it executes, for Netron and for the deployment report.

Rules:
1. Requires a model without variation ops (run StripSimulationPass first): a simulation graph is
   not what a chip runs.
2. Every node's ``doc_string`` (which onnxruntime ignores and Netron shows) becomes a tag:
   ``rrcompile: analog crossbar, RxC tiles of TRxTC (rows x cols ROWSxCOLS)`` for an analog layer
   (its own arrays where the graph keeps its tiles, else ``tile`` x ``tile``), ``rrcompile: analog
   crossbar (...)`` for the tile layout of a tiled layer, ``rrcompile: ADC, B bits (...)`` for its
   converters, ``rrcompile: digital (compensation)`` for a trained compensation node,
   ``rrcompile: digital (calibrated per chip)`` for a calibration slot, ``rrcompile: digital``
   otherwise (the sum over tiles and the bias included).
3. ``model.metadata_props`` gets ``rrcompile.hardware``: the :class:`HardwareReport` as JSON
   (replacing an earlier one).
"""
from __future__ import annotations

import json

import onnx

from rrcompile.compensation import COMPENSATIONS, is_compensation
from rrcompile.crossbar import is_adc, is_crossbar
from rrcompile.devices import is_variation
from rrcompile.graph import keep_where
from rrcompile.hardware import DEFAULT_TILE, METADATA_KEY, HardwareReport
from rrcompile.pass_manager import Pass, PassResult


class TagHardwarePass(Pass):
    in_place = True

    def __init__(self, tile: int = DEFAULT_TILE, *, calibration_images: int | None = None,
                 calibration_seconds: float | None = None):
        if tile < 1:
            raise ValueError(f"tile must be >= 1, got {tile}")
        self.tile = tile
        self.calibration = {"calibration_images": calibration_images, "calibration_seconds": calibration_seconds}

    def requires(self, model: onnx.ModelProto) -> None:
        if any(is_variation(n) for n in model.graph.node):
            raise self.fail("the model still simulates variation; run StripSimulationPass first")

    def call(self, model: onnx.ModelProto) -> PassResult:
        report = HardwareReport.of(model, self.tile, **self.calibration)
        layers = {layer.name: layer for layer in report.layers}
        for node in model.graph.node:
            if node.name in layers:
                layer = layers[node.name]
                node.doc_string = (f"rrcompile: analog crossbar, {layer.grid} tiles of {layer.tile_rows}x{layer.tile_cols} "
                                   f"(rows x cols {layer.rows}x{layer.cols})")
            elif is_adc(node):
                bits = next(a.i for a in node.attribute if a.name == "bits")
                node.doc_string = f"rrcompile: ADC, {bits} bits (each tile's column outputs: the analog/digital border)"
            elif is_crossbar(node):
                node.doc_string = "rrcompile: analog crossbar (the layer's rows split over its tiles)"
            elif is_compensation(node):
                calibrated = COMPENSATIONS[node.op_type].calibrated
                node.doc_string = f"rrcompile: digital ({'calibrated per chip' if calibrated else 'compensation'})"
            else:
                node.doc_string = "rrcompile: digital"
        keep_where(model.metadata_props, lambda p: p.key != METADATA_KEY)
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(report.to_dict()))
        return PassResult(model, True)
