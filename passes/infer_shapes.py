"""InferShapesPass: annotate every intermediate tensor with its inferred type and shape.

Rules:
1. ONNX shape inference runs in strict mode with data propagation; an inconsistency is an error
   naming the node, not a silently unannotated tensor.
"""
from __future__ import annotations

import onnx

from rrcompile.pass_manager import Pass, PassResult


class InferShapesPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        try:
            inferred = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
        except onnx.shape_inference.InferenceError as exc:
            raise self.fail(str(exc).strip().splitlines()[0]) from None
        return PassResult(inferred, inferred.graph.value_info != model.graph.value_info)
