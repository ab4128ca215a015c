"""MakeBatchSymbolicPass: replace a fixed batch size by the symbolic dimension ``N``.

Rules:
1. Applies when every graph input has the same fixed leading dimension B (exporters often bake
   the example batch in: mnist-8 has B = 1, lenet5_mnist B = 10). A model whose inputs already
   have a symbolic leading dim is left alone.
2. The leading dim of every graph input, and of every graph output whose leading dim is B,
   becomes ``N``; stale intermediate shape annotations are dropped.
3. A Reshape whose target shape is a constant starting with B, and whose data input carries the
   batch as its leading dim (by shape inference), gets a new constant target whose first entry is
   0 ("copy the input's dim"), or -1 when ``allowzero`` is set and no other entry is -1.
   Rule 3 is repeated until no such Reshape is left, since fixing one exposes the next.
4. Shape inference must then give no graph output a fixed leading dim (``N`` or a dim it cannot
   name, as after ``Reshape(x, [-1, 400])``); otherwise the pass fails naming the output, rather
   than leaving a graph that only runs at batch B.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from rrcompile.graph import tensor_shapes
from rrcompile.pass_manager import Pass, PassResult

BATCH_DIM = "N"


def _leading_dim(vi: onnx.ValueInfoProto) -> onnx.TensorShapeProto.Dimension | None:
    dims = vi.type.tensor_type.shape.dim
    return dims[0] if len(dims) else None


class MakeBatchSymbolicPass(Pass):
    in_place = True

    def call(self, model: onnx.ModelProto) -> PassResult:
        leading = [_leading_dim(i) for i in model.graph.input]
        if not leading or any(d is None or not d.HasField("dim_value") for d in leading):
            return PassResult(model, False)
        batch_sizes = {d.dim_value for d in leading}
        if len(batch_sizes) != 1:
            return PassResult(model, False)  # inputs disagree: no single batch to generalize
        batch = batch_sizes.pop()

        for vi in [*model.graph.input, *model.graph.output]:
            dim = _leading_dim(vi)
            if dim is not None and dim.HasField("dim_value") and dim.dim_value == batch:
                dim.dim_param = BATCH_DIM
        del model.graph.value_info[:]
        while self._generalize_one_reshape_layer(model, batch):
            pass
        self._check_outputs_batched(model)
        return PassResult(model, True)

    def _generalize_one_reshape_layer(self, model: onnx.ModelProto, batch: int) -> bool:
        shapes = tensor_shapes(model)
        consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        changed = False
        for node in model.graph.node:
            if node.op_type != "Reshape" or node.input[1] not in consts:
                continue
            target = consts[node.input[1]]
            data_shape = shapes.get(node.input[0], [])
            if target.ndim != 1 or not len(target) or int(target[0]) != batch:
                continue
            if not data_shape or data_shape[0] != BATCH_DIM:
                continue
            allow_zero = any(a.name == "allowzero" and a.i for a in node.attribute)
            new_target = target.astype(np.int64).copy()
            if not allow_zero:
                new_target[0] = 0
            elif -1 not in new_target:
                new_target[0] = -1
            else:
                raise self.fail(f"Reshape '{node.name}' fixes the batch at {batch} and cannot be generalized")
            name = f"{node.name}_shape_batch{BATCH_DIM}"
            model.graph.initializer.append(numpy_helper.from_array(new_target, name))
            node.input[1] = name
            changed = True
        return changed

    def _check_outputs_batched(self, model: onnx.ModelProto) -> None:
        probe = onnx.ModelProto.FromString(model.SerializeToString())
        for out in probe.graph.output:
            out.type.tensor_type.ClearField("shape")
        shapes = tensor_shapes(probe)
        for out in model.graph.output:
            inferred = shapes.get(out.name)
            if inferred and isinstance(inferred[0], int):
                raise self.fail(f"output '{out.name}' keeps a fixed batch ({inferred[0]}) after the rewrite")
