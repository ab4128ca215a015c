"""Calibration slots folded into their layers, for simulating a chip fast.

A calibration slot after a plain analog layer computes (``rrcompile.compensation``)

    Z = A * Y + B + G * up(down(X)),    Y = W X + b,

with ``down`` reading the layer's own input ``X`` with the layer's geometry (a convolution with its
kernel, strides, pads and dilations, then a 1x1 ``up``; or two matrix products). Everything in it is
linear in ``X``, so for one programmed chip (its ``W`` fixed) the slot and the layer are one layer
of the layer's shape:

    W' = A * W + G * (Wu Wd),    b' = A * b + B        (per output column)

The hardware runs the analog layer and the digital slot apart; the simulation may run ``W'``, which
gives the same outputs to float rounding at the cost of the layer alone. LeNet-5 with slots of
ranks 4/4/0/0/4 (onnxruntime's profile, batches of 500 on 2 cores): 19.0 ms of kernels a batch
with the slots, 6.6 ms for the network without them.

Folded are the slots of calibrated kind whose layer is a group-1 ``Conv`` or a ``Gemm`` (alpha and
beta 1, ``transA`` 0) read directly, without tiles or converters (the slot then corrects a
nonlinear readout), whose output feeds the slot alone, whose weight and bias no other node reads,
and whose weights and slot parameters are all initializers. Other slots stay as they are.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rrcompile.compensation import COMPENSATIONS, candidates
from rrcompile.graph import keep_where, remove_unused_functions


@dataclasses.dataclass(frozen=True)
class _Fold:
    layer: str  # the analog node
    conv: bool
    transposed: bool  # a Gemm's transB: the weight is stored [cols, rows]
    weight: str  # the layer's weight initializer (its programmed weight in a chip model)
    bias: str  # the layer's bias initializer (made, zero, when the layer had none)
    down: str
    up: str
    gate: str
    gain: str
    offset: str


class FoldedSlots:
    """``model`` with its foldable calibration slots folded into their layers (``self.model``);
    :meth:`values` gives the folded layers' initializers for given weights and slot parameters."""

    def __init__(self, model: onnx.ModelProto):
        self.model = onnx.ModelProto.FromString(model.SerializeToString())
        graph = self.model.graph
        self.initial = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        nodes = {n.name: n for n in graph.node}
        consumers: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                consumers[name] = consumers.get(name, 0) + 1
        outputs = {o.name for o in graph.output}
        folds, removed = [], set()
        for c in candidates(self.model):
            layer, slot = nodes.get(c.layer), nodes[c.node]
            if not COMPENSATIONS[c.op].calibrated or layer is None or not self._plain(layer, slot, consumers, outputs):
                continue
            if any(name and name not in self.initial for name in (*layer.input[1:3], c.down, c.up, c.gate, c.gain, c.offset)):
                continue  # a weight or parameter computed or fed at run time: known only then
            if len(layer.input) < 3 or not layer.input[2]:
                bias = f"{layer.name}.folded_bias"
                cols = self.initial[layer.input[1]].shape[0 if layer.op_type == "Conv" or _attr(layer, "transB", 0) else 1]
                graph.initializer.append(numpy_helper.from_array(np.zeros(cols, np.float32), bias))
                self.initial[bias] = np.zeros(cols, np.float32)
                del layer.input[2:]
                layer.input.append(bias)
            folds.append(_Fold(layer.name, layer.op_type == "Conv", bool(_attr(layer, "transB", 0)), layer.input[1],
                               layer.input[2], c.down, c.up, c.gate, c.gain, c.offset))
            layer.output[0] = slot.output[0]
            removed.add(slot.name)
        self.folds = folds
        kept = [n for n in graph.node if n.name not in removed]
        del graph.node[:]
        graph.node.extend(kept)
        used = {name for n in graph.node for name in n.input}
        keep_where(graph.initializer, lambda t: t.name in used)
        keep_where(graph.input, lambda i: i.name in used or i.name not in self.initial)
        remove_unused_functions(self.model)
        # the slots' parameters, which the folded layers now hold
        self.absorbed = {name for f in folds for name in (f.down, f.up, f.gate, f.gain, f.offset)}

    @staticmethod
    def _plain(layer: onnx.NodeProto, slot: onnx.NodeProto, consumers: Mapping[str, int], outputs: set[str]) -> bool:
        """Whether ``slot`` reads ``layer``'s output and input directly, and ``layer`` folds."""
        if slot.input[0] != layer.output[0] or slot.input[1] != layer.input[0]:
            return False  # a tiled or converted layer: its output is not W x + b
        if consumers.get(layer.output[0], 0) != 1 or layer.output[0] in outputs:
            return False
        if any(consumers.get(name, 0) != 1 for name in layer.input[1:3] if name):
            return False  # a weight or bias another node reads too: the folded values are this layer's alone
        if layer.op_type == "Conv":
            return _attr(layer, "group", 1) == 1
        return layer.op_type == "Gemm" and _attr(layer, "alpha", 1.0) == 1.0 and _attr(layer, "beta", 1.0) == 1.0 \
            and not _attr(layer, "transA", 0)

    def values(self, weights: Mapping[str, np.ndarray], digital: Mapping[str, np.ndarray] | None = None,
               ) -> dict[str, np.ndarray]:
        """Each folded layer's weight and bias, from ``weights`` (a layer weight's value by initializer
        name, e.g. a chip's programmed weights; else the model's) and the slots' ``digital``
        parameters (else the model's: an uncalibrated slot is the identity)."""
        def value(name: str) -> np.ndarray:
            if digital is not None and name in digital:
                return np.asarray(digital[name], np.float64)
            return np.asarray(weights[name] if name in weights else self.initial[name], np.float64)

        folded = {}
        for f in self.folds:
            w, b = value(f.weight), value(f.bias)
            down, up, gate = value(f.down), value(f.up), float(value(f.gate).reshape(-1)[0])
            gain, offset = value(f.gain).reshape(-1), value(f.offset).reshape(-1)
            if f.conv:  # Wu [cols, r, 1..] after Wd [r, cin, k..]: one [cols, cin, k..] kernel (zeros at rank 0)
                correction = np.tensordot(up.reshape(up.shape[0], -1), down, axes=1)
                w = gain.reshape(-1, *[1] * (w.ndim - 1)) * w + gate * correction
            else:  # x Wd Wu: [rows, cols], the weight's orientation without transB
                correction = down @ up  # rank 0: [rows, 0] @ [0, cols], zeros
                w = (w * gain[:, None] + gate * correction.T) if f.transposed else (w * gain + gate * correction)
            folded[f.weight] = w.astype(np.float32)
            folded[f.bias] = (gain * b + offset).astype(np.float32)
        return folded


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default

