"""RemoveInitializerInputsPass: stop listing weights as graph inputs.

Rules:
1. A graph input that has an initializer of the same name is removed from the inputs (IR < 4
   exporters such as CNTK's list every weight as an input); the initializer stays.

Why: while a weight is also an input, onnxruntime treats it as overridable and will not fold it,
and "the model's input" would be ambiguous for the evaluator.
"""
from __future__ import annotations

import onnx

from rrcompile.pass_manager import Pass, PassResult


class RemoveInitializerInputsPass(Pass):
    in_place = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        weights = {t.name for t in model.graph.initializer}
        keep = [i for i in model.graph.input if i.name not in weights]
        if len(keep) == len(model.graph.input):
            return PassResult(model, False)
        del model.graph.input[:]
        model.graph.input.extend(keep)
        if model.ir_version < 4:
            model.ir_version = 4  # the first IR version that allows initializers outside the inputs
        return PassResult(model, True)

    def ensures(self, model: onnx.ModelProto) -> None:
        if not model.graph.input:
            raise self.fail("the model has no runtime input left")
