"""MakeBatchSymbolicPass: a baked-in batch that cannot be generalized is an error naming the output."""
from __future__ import annotations

import numpy as np
import pytest
from graph_builders import make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.errors import PassError
from rrcompile.passes.make_batch_symbolic import MakeBatchSymbolicPass


def test_batch_folded_into_features_is_reported():
    # Reshape [2,3] -> [1,6] merges the batch into the features; no symbolic rewrite is exact
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"], name="merge_batch")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6])],
        [numpy_helper.from_array(np.array([1, 6], np.int64), "shape")])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(PassError, match="MakeBatchSymbolicPass: output 'y' keeps a fixed batch"):
        MakeBatchSymbolicPass()(model)


def test_symbolic_batch_is_left_alone():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 3])])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert not MakeBatchSymbolicPass()(model).modified
