"""FoldConstantsPass: evaluate every subgraph whose inputs are all constant.

Rules:
1. A node whose inputs are all initializers or Constant outputs is evaluated (by onnxruntime, via
   onnx-graphsurgeon) and replaced by an initializer; Constant nodes become initializers.
2. Shape computations whose result does not depend on the symbolic batch are folded too.
3. Nodes and initializers left unused are removed.

Why: weights that reach a Conv or MatMul through a Reshape or Transpose (mnist-8 reshapes its FC
weight at run time) must become plain initializers to count as analog layers.
"""
from __future__ import annotations

import onnx

from rrcompile.graph import export_graph, import_graph
from rrcompile.pass_manager import Pass, PassResult


class FoldConstantsPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        nodes_before = len(graph.nodes)
        graph.fold_constants(error_ok=False).cleanup(remove_unused_graph_inputs=False)
        if len(graph.nodes) == nodes_before:
            return PassResult(model, False)
        return PassResult(export_graph(graph, model), True)
