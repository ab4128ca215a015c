"""FoldBatchNormPass: fold an inference-mode BatchNormalization into the Conv or Gemm before it.

Rules:
1. BatchNormalization with one output (inference mode) and constant scale, bias, mean, var.
2. Its input is produced by a Conv (any group count) or a Gemm with a constant weight, and read
   by nothing else (else the un-normalized tensor is still needed, and folding is not legal).
3. With ``s = scale / sqrt(var + eps)``: the layer's weight is scaled by ``s`` along its output
   axis (Conv: axis 0; Gemm: axis 0 if transB else 1) and its bias becomes
   ``(beta_gemm * b - mean) * s + bias`` (Gemm's beta becomes 1); the layer takes over the BN's
   output and the BN disappears.

Why: on a crossbar the BN scale is programmed into the conductances anyway; folded, a layer's
variation acts on the weights it really has.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from rrcompile.graph import export_graph, import_graph, only_consumer, unique_name, writable_constant
from rrcompile.pass_manager import Pass, PassResult


class FoldBatchNormPass(Pass):
    def call(self, model: onnx.ModelProto) -> PassResult:
        graph = import_graph(model)
        modified = False
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if len(bn.outputs) != 1 or not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
                continue
            producers = bn.inputs[0].inputs
            layer = producers[0] if len(producers) == 1 else None
            if layer is None or layer.op not in ("Conv", "Gemm") or only_consumer(bn.inputs[0], graph) is not bn:
                continue
            if not isinstance(layer.inputs[1], gs.Constant) or (len(layer.inputs) > 2 and not isinstance(layer.inputs[2], gs.Constant)):
                continue
            scale, beta, mean, var = (t.values.astype(np.float64) for t in bn.inputs[1:5])
            s = scale / np.sqrt(var + bn.attrs.get("epsilon", 1e-5))
            weight = writable_constant(graph, layer.inputs[1], layer, f"{layer.name}.weight")
            dtype = weight.values.dtype
            out_axis = 0 if layer.op == "Conv" or layer.attrs.get("transB", 0) else 1
            shape = [1] * weight.values.ndim
            shape[out_axis] = -1
            weight.values = (weight.values * s.reshape(shape)).astype(dtype)
            old_bias = layer.inputs[2].values.astype(np.float64) if len(layer.inputs) > 2 else np.zeros(len(s))
            if layer.op == "Gemm":
                old_bias = np.broadcast_to(old_bias * layer.attrs.get("beta", 1.0), (len(s),))
                layer.attrs["beta"] = 1.0
            bias = gs.Constant(unique_name(graph, f"{layer.name}.bias"), ((old_bias - mean) * s + beta).astype(dtype))
            layer.inputs = [layer.inputs[0], weight, bias]
            layer.outputs = list(bn.outputs)
            bn.outputs.clear()
            modified = True
        return PassResult(export_graph(graph, model) if modified else model, modified)
