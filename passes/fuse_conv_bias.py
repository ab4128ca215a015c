"""FuseConvBiasPass: fold a constant ``Add`` after a Conv into the Conv's bias.

Rules:
1. Conv with a constant weight, whose output feeds only an Add (and is no graph output).
2. The Add's other operand is constant and broadcasts along the channel axis only: shapes [C],
   [C,1,1], [1,C,1,1] or a scalar.
3. The Conv's bias becomes old bias (or zeros) + that operand; the Conv takes over the Add's
   output tensor and the Add disappears.

Why: CNTK (mnist-8) and some TF converters emit the bias as a separate Add; as one Conv, the
layer's bias and weight travel together through every later pass.
"""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from rrcompile.graph import constant_value, export_graph, import_graph, only_consumer, per_channel, unique_name, writable_constant
from rrcompile.pass_manager import Pass, PassResult


class FuseConvBiasPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        modified = False
        for conv in [n for n in graph.nodes if n.op == "Conv"]:
            weight = conv.inputs[1]
            add = only_consumer(conv.outputs[0], graph)
            if not isinstance(weight, gs.Constant) or add is None or add.op != "Add":
                continue
            operand = add.inputs[1] if add.inputs[0] is conv.outputs[0] else add.inputs[0]
            value = constant_value(operand)
            if value is None:
                continue
            channels = weight.shape[0]
            extra = per_channel(value, channels, len(weight.shape))
            if extra is None:
                continue
            if len(conv.inputs) > 2 and isinstance(conv.inputs[2], gs.Constant):
                bias = writable_constant(graph, conv.inputs[2], conv, f"{conv.name}.bias")
                bias.values = (bias.values + extra).astype(weight.values.dtype)
            elif len(conv.inputs) > 2:
                continue  # a run-time bias cannot absorb a constant
            else:
                bias = gs.Constant(unique_name(graph, f"{conv.name}.bias"), extra.astype(weight.values.dtype).copy())
            conv.inputs = [conv.inputs[0], weight, bias]
            conv.outputs = list(add.outputs)
            add.outputs.clear()
            modified = True
        return PassResult(export_graph(graph, model) if modified else model, modified)
