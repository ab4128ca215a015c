"""StripSimulationPass: turn a simulation graph into the graph a chip runs.

Rules:
1. Every variation op (an ``ai.rrcompile`` node whose op type is a device model) is removed, with
   the ``<layer>.weight_abs`` and ``<layer>.weight_range`` nodes that fed it the layer's range;
   each analog layer reads its target weight initializer again.
2. The noise graph inputs go, and the functions no node calls any more (and the ``ai.rrcompile``
   import once unused).
3. A tiled layer (``tile`` / ``adc`` terms) computes untiled again: its crossbar nodes, their
   initializers and the ADC noise input go, and the analog node reads its weight and bias and
   writes its output again (:func:`rrcompile.crossbar.untile`); ``deploy`` then puts the tiles
   and noiseless ADCs back, with their ranges.
4. Every compensation gate stops being a graph input and stays an initializer with its value: a
   chip has nobody to feed it, and a constant lets onnxruntime fold it.
The result has no variation op, its only graph inputs are the model's data inputs, and it passes
the full ONNX check.
"""
from __future__ import annotations

import onnx

from rrcompile.compensation import candidates
from rrcompile.crossbar import is_crossbar, untile
from rrcompile.devices import is_variation, noise_inputs
from rrcompile.graph import analog_layers, keep_where, remove_unused_functions
from rrcompile.pass_manager import Pass, PassResult


class StripSimulationPass(Pass):
    in_place = True

    def ensures(self, model: onnx.ModelProto) -> None:
        if any(is_variation(n) or is_crossbar(n) for n in model.graph.node):
            raise self.fail("variation or crossbar ops remain")
        inits = {t.name for t in model.graph.initializer}
        if any(vi.name in inits for vi in model.graph.input):
            raise self.fail("a graph input is still backed by an initializer")
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise self.fail(f"stripped model fails the ONNX checker: {str(exc).splitlines()[0]}") from None

    def call(self, model: onnx.ModelProto) -> PassResult:
        gates = {c.gate for c in candidates(model)}
        if not any(is_variation(n) or is_crossbar(n) for n in model.graph.node) \
                and not gates & {vi.name for vi in model.graph.input}:
            return PassResult(model, False)
        noise = {n.name for n in noise_inputs(model)}
        untile(model)
        by_name = {n.name: n for n in model.graph.node}
        range_nodes = set()
        for layer in analog_layers(model):
            by_name[layer.node].input[1] = layer.weight
            range_nodes |= {f"{layer.node}.weight_abs", f"{layer.node}.weight_range"}
        keep_where(model.graph.node, lambda n: not is_variation(n) and n.name not in range_nodes)
        keep_where(model.graph.input, lambda vi: vi.name not in noise | gates)
        produced = {out for n in model.graph.node for out in n.output}
        keep_where(model.graph.value_info, lambda vi: vi.name in produced)
        remove_unused_functions(model)
        return PassResult(model, True)
