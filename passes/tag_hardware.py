"""TagHardwarePass: record on every node where it executes, for Netron and for the deployment report.

Rules:
1. Requires a model without variation ops (run StripSimulationPass first): a simulation graph is
   not what a chip runs.
2. Every node's ``doc_string`` (which onnxruntime ignores and Netron shows) becomes a tag:
   ``rrcompile: analog crossbar, RxC tiles of TxT (rows x cols ROWSxCOLS)`` for an analog layer,
   ``rrcompile: digital (compensation)`` for a trained compensation node, ``rrcompile: digital
   (calibrated per chip)`` for a calibration slot, ``rrcompile: digital`` otherwise.
3. ``model.metadata_props`` gets ``rrcompile.hardware``: the :class:`HardwareReport` as JSON
   (replacing an earlier one).
"""
from __future__ import annotations

import json
import math

import onnx

from rrcompile.compensation import COMPENSATIONS, is_compensation
from rrcompile.devices import is_variation
from rrcompile.graph import analog_layers, keep_where
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
        layers = {layer.node: layer for layer in analog_layers(model)}
        for node in model.graph.node:
            if node.name in layers:
                layer = layers[node.name]
                grid = f"{math.ceil(layer.rows / self.tile)}x{math.ceil(layer.cols / self.tile)}"
                node.doc_string = (f"rrcompile: analog crossbar, {grid} tiles of {self.tile}x{self.tile} "
                                   f"(rows x cols {layer.rows}x{layer.cols})")
            elif is_compensation(node):
                calibrated = COMPENSATIONS[node.op_type].calibrated
                node.doc_string = f"rrcompile: digital ({'calibrated per chip' if calibrated else 'compensation'})"
            else:
                node.doc_string = "rrcompile: digital"
        keep_where(model.metadata_props, lambda p: p.key != METADATA_KEY)
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(HardwareReport.of(model, self.tile, **self.calibration).to_dict()))
        return PassResult(model, True)
