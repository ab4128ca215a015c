"""CanonicalizePass: bring a real exported model into the one form the compiler works on.

Rules (each is its own pass, run in this order):
1. RemoveInitializerInputsPass: weights are initializers, not graph inputs.
2. ConvertOpsetPass: the default domain at opset ``TARGET_OPSET``.
3. NameNodesPass: every node has a unique name.
4. MakeBatchSymbolicPass: a fixed batch becomes the symbolic ``N``.
5. FoldConstantsPass: weights computed from constants become initializers.
6. FuseConvBiasPass, FuseMatMulAddPass, FoldBatchNormPass, repeated until nothing changes
   (a BN folds into a Conv only once the Conv has absorbed its Add).
7. RemoveDeadNodesPass: no dead nodes, topological order.
8. InferShapesPass: every tensor annotated.

Outputs are unchanged (checked numerically in the tests on each quirk and on the real models).
"""
from __future__ import annotations

import onnx

from rrcompile.pass_manager import PassManager
from rrcompile.passes.convert_opset import ConvertOpsetPass
from rrcompile.passes.fold_batchnorm import FoldBatchNormPass
from rrcompile.passes.fold_constants import FoldConstantsPass
from rrcompile.passes.fuse_conv_bias import FuseConvBiasPass
from rrcompile.passes.fuse_matmul_add import FuseMatMulAddPass
from rrcompile.passes.infer_shapes import InferShapesPass
from rrcompile.passes.make_batch_symbolic import MakeBatchSymbolicPass
from rrcompile.passes.name_nodes import NameNodesPass
from rrcompile.passes.remove_dead_nodes import RemoveDeadNodesPass
from rrcompile.passes.remove_initializer_inputs import RemoveInitializerInputsPass


class CanonicalizePass(PassManager):
    def __init__(self) -> None:
        super().__init__(
            [
                RemoveInitializerInputsPass(),
                ConvertOpsetPass(),
                NameNodesPass(),
                MakeBatchSymbolicPass(),
                FoldConstantsPass(),
                PassManager([FuseConvBiasPass(), FuseMatMulAddPass(), FoldBatchNormPass()], steps=4),
                RemoveDeadNodesPass(),
                InferShapesPass(),
            ]
        )

    def ensures(self, model: onnx.ModelProto) -> None:
        try:
            onnx.checker.check_model(model, full_check=True)
        except Exception as exc:
            raise self.fail(f"canonical model fails the ONNX checker: {str(exc).splitlines()[0]}") from None
