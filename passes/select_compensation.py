"""SelectCompensationPass: keep the compensation candidates of the chosen layers, drop the rest.

Rules:
1. ``keep`` names analog layers (node names); each must have a candidate, or the pass fails naming
   those that do not.
2. A dropped candidate's node is removed and its layer writes the original output name again; its
   down, up, gate (and calibrated gain and offset) initializers, and the gate's graph input, go with it.
3. Functions no node calls any more are removed, and the ``ai.rrcompile`` import once unused.
The outputs equal those of the input model with the dropped candidates' gates fed 0.
"""
from __future__ import annotations

from typing import Iterable

import onnx

from rrcompile.compensation import candidates
from rrcompile.graph import keep_where, remove_unused_functions
from rrcompile.pass_manager import Pass, PassResult


class SelectCompensationPass(Pass):
    in_place = True

    def __init__(self, keep: Iterable[str]):
        self.keep = set(keep)

    def requires(self, model: onnx.ModelProto) -> None:
        unknown = self.keep - {c.layer for c in candidates(model)}
        if unknown:
            raise self.fail(f"no compensation candidate for layer(s) {', '.join(sorted(unknown))}")

    def call(self, model: onnx.ModelProto) -> PassResult:
        dropped = [c for c in candidates(model) if c.layer not in self.keep]
        if not dropped:
            return PassResult(model, False)
        by_name = {n.name: n for n in model.graph.node}
        removed_tensors = set()
        for candidate in dropped:
            layer, node = by_name[candidate.layer], by_name[candidate.node]
            removed_tensors |= {layer.output[0], candidate.down, candidate.up, candidate.gate, candidate.gain, candidate.offset}
            layer.output[0] = node.output[0]
        removed_nodes = {c.node for c in dropped}
        keep_where(model.graph.node, lambda n: n.name not in removed_nodes)
        for field in (model.graph.initializer, model.graph.input, model.graph.value_info):
            keep_where(field, lambda t: t.name not in removed_tensors)
        remove_unused_functions(model)
        return PassResult(model, True)
