"""ConvertOpsetPass: bring the default ONNX domain to one target opset.

Rules:
1. If the model imports the default domain at a version other than ``target``, run the ONNX version
   converter to ``target``; other domains are left as they are.
2. The IR version becomes at least the one that defines ``target``.

Why: every later pass, and the torch op table, is written against one opset's semantics
(e.g. Reshape's ``allowzero``, ReduceMax's axes input, Softmax's axis meaning).
"""
from __future__ import annotations

import onnx
import onnx.version_converter

from rrcompile.graph import TARGET_IR_VERSION, TARGET_OPSET, default_opset
from rrcompile.pass_manager import Pass, PassResult


class ConvertOpsetPass(Pass):
    def __init__(self, target: int = TARGET_OPSET):
        self.target = target

    def call(self, model: onnx.ModelProto) -> PassResult:
        if default_opset(model) == self.target:
            return PassResult(model, False)
        try:
            converted = onnx.version_converter.convert_version(model, self.target)
        except Exception as exc:
            line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise self.fail(f"cannot convert opset {default_opset(model)} to {self.target}: {line}") from None
        converted.ir_version = max(converted.ir_version, TARGET_IR_VERSION)
        return PassResult(converted, True)

    def ensures(self, model: onnx.ModelProto) -> None:
        if default_opset(model) != self.target:
            raise self.fail(f"model still at opset {default_opset(model)}")
