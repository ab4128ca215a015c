"""NameNodesPass: give every node a unique, stable name.

Rules:
1. A node without a name, or whose name repeats an earlier node's, is renamed ``<OpType>_<index>``
   (index = its position in the graph), with a numeric suffix if that is taken too.

Why: layers are addressed by node name everywhere (device files, reports, the RL agent's graph);
PyTorch's old exporter leaves names empty.
"""
from __future__ import annotations

import onnx

from rrcompile.pass_manager import Pass, PassResult


class NameNodesPass(Pass):
    in_place = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        taken = {n.name for n in model.graph.node if n.name}
        seen: set[str] = set()
        renames: dict[int, str] = {}
        for index, node in enumerate(model.graph.node):
            if node.name and node.name not in seen:
                seen.add(node.name)
                continue
            name, suffix = f"{node.op_type}_{index}", 1
            while name in taken or name in seen:
                name, suffix = f"{node.op_type}_{index}_{suffix}", suffix + 1
            renames[index] = name
            seen.add(name)
        if not renames:
            return PassResult(model, False)
        for index, name in renames.items():
            model.graph.node[index].name = name
        return PassResult(model, True)

    def ensures(self, model: onnx.ModelProto) -> None:
        names = [n.name for n in model.graph.node]
        if "" in names or len(set(names)) != len(names):
            raise self.fail("node names are still missing or repeated")
