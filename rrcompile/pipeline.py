"""The compiler in one screen: each stage is a pass (or pass manager) from ``rrcompile.passes``.

    model = load_model(path)            # checked ONNX
    model = canonicalize(model)         # one opset, symbolic batch, fused biases, folded BN
    varied = simulate(model, device)    # + ai.rrcompile variation ops, noise inputs per layer
    MonteCarloEvaluator(model, device)  # accuracy over simulated chips (rrcompile.evaluate)
"""
from __future__ import annotations

import onnx

from rrcompile.devices import DeviceConfig
from rrcompile.passes.canonicalize import CanonicalizePass
from rrcompile.passes.insert_variation import InsertVariationPass


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    return CanonicalizePass()(model).model


def simulate(model: onnx.ModelProto, device: DeviceConfig) -> onnx.ModelProto:
    """The canonical model with every analog weight routed through ``device``'s models."""
    return InsertVariationPass(device)(canonicalize(model)).model
