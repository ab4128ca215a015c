"""FuseMatMulAddPass: turn ``MatMul(A, W) + b`` with constant W and b into one Gemm.

Rules:
1. MatMul whose second operand W is a constant 2-D matrix [K, M] and whose first operand A is
   2-D by shape inference (Gemm is only defined for matrices).
2. Its output feeds only an Add whose other operand is constant and broadcasts to [1, M].
3. They become ``Gemm(A, W, b)`` (transB = 0, so W keeps its name and layout), named after the
   MatMul, writing the Add's output.

Why: exporters that predate Gemm (CNTK, TF) emit MatMul + Add; one Gemm carries weight and bias
as one layer for the rest of the compiler.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from rrcompile.graph import constant_value, export_graph, import_graph, only_consumer, per_channel, tensor_shapes, unique_name
from rrcompile.pass_manager import Pass, PassResult


class FuseMatMulAddPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        shapes = tensor_shapes(model)
        graph = import_graph(model)
        modified = False
        for matmul in [n for n in graph.nodes if n.op == "MatMul"]:
            data, weight = matmul.inputs
            add = only_consumer(matmul.outputs[0], graph)
            if not isinstance(weight, gs.Constant) or weight.values.ndim != 2 or add is None or add.op != "Add":
                continue
            if len(shapes.get(data.name, [])) != 2:
                continue
            operand = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
            value = constant_value(operand)
            bias = None if value is None else per_channel(value, weight.shape[1], 2)
            if bias is None:
                continue
            bias_const = gs.Constant(unique_name(graph, f"{matmul.name}.bias"), bias.astype(weight.values.dtype).copy())
            gemm = gs.Node("Gemm", matmul.name, attrs={"transB": 0}, inputs=[data, weight, bias_const], outputs=list(add.outputs))
            add.outputs.clear()
            matmul.outputs.clear()
            graph.nodes.append(gemm)
            modified = True
        return PassResult(export_graph(graph, model) if modified else model, modified)
