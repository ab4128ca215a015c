"""RemoveDeadNodesPass: drop what no graph output depends on, and sort the rest topologically.

Rules:
1. Nodes, initializers and intermediate tensors that no graph output depends on are removed;
   graph inputs stay (they are the model's signature).
2. The remaining nodes are put in topological order.
"""
from __future__ import annotations

import onnx

from rrcompile.graph import export_graph, import_graph
from rrcompile.pass_manager import Pass, PassResult


class RemoveDeadNodesPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        before = [n.name for n in model.graph.node], len(model.graph.initializer)
        cleaned = export_graph(import_graph(model), model)
        after = [n.name for n in cleaned.graph.node], len(cleaned.graph.initializer)
        if before == after:
            return PassResult(model, False)
        return PassResult(cleaned, True)
