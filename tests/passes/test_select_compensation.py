"""SelectCompensationPass: a kept subset behaves like the full graph with the other gates at 0."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, gates, run, with_up_weights
from graph_builders import QUIRK_MODELS

from rrcompile.compensation import candidates
from rrcompile.devices import noise_inputs, parse_device
from rrcompile.errors import PassError
from rrcompile.graph import RRCOMPILE_DOMAIN
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.select_compensation import SelectCompensationPass
from rrcompile.pipeline import canonicalize


def compensated_digits() -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    return model, with_up_weights(InsertCompensationCandidatesPass()(model).model), x


def test_subset_equals_full_graph_with_dropped_gates_off():
    model, full, x = compensated_digits()
    selected = SelectCompensationPass(["conv2", "fc2"])(full).model
    onnx.checker.check_model(selected, full_check=True)
    assert [c.layer for c in candidates(selected)] == ["conv2", "fc2"]
    dropped = gates(full, 0.0, ["conv1", "fc1"])
    np.testing.assert_allclose(run(selected, x), run(full, x, **dropped), atol=1e-5, rtol=0)
    assert np.abs(run(selected, x) - run(model, x)).max() > 1e-3

    names = {n.name: n for n in selected.graph.node}
    assert list(names["conv1"].output) == list(next(n for n in model.graph.node if n.name == "conv1").output)
    assert "conv1.compensation" not in names and "conv2.analog_output" in names["conv2"].output
    leftovers = [t.name for t in [*selected.graph.initializer, *selected.graph.input, *selected.graph.value_info]
                 if t.name.startswith(("conv1.comp", "conv1.analog", "fc1.comp", "fc1.analog"))]
    assert leftovers == []


def test_dropping_a_kind_removes_its_function_and_dropping_all_removes_the_domain():
    model, full, x = compensated_digits()
    dense_only = SelectCompensationPass(["fc1"])(full).model
    assert [f.name for f in dense_only.functions] == ["DenseCompensation"]
    none = SelectCompensationPass([])(full).model
    onnx.checker.check_model(none, full_check=True)
    assert not none.functions and RRCOMPILE_DOMAIN not in [o.domain for o in none.opset_import]
    assert [i.name for i in none.graph.input] == [i.name for i in model.graph.input]
    np.testing.assert_allclose(run(none, x), run(model, x), atol=1e-5, rtol=0)
    assert SelectCompensationPass(["conv1", "conv2", "fc1", "fc2"])(full).modified is False


def test_selection_on_a_varied_model_keeps_its_variation():
    original, x = QUIRK_MODELS["torch_fixed_batch_softmax"]()
    varied = InsertVariationPass(parse_device("lognormal:sigma=0.5"))(canonicalize(original)).model
    full = with_up_weights(InsertCompensationCandidatesPass()(varied).model)
    selected = SelectCompensationPass(["Gemm_5"])(full).model
    chip = {n.name: n.noise.draw(np.random.default_rng(1), n.shape) for n in noise_inputs(full)}
    assert [n.name for n in noise_inputs(selected)] == list(chip)
    np.testing.assert_allclose(run(selected, x, **chip), run(full, x, **chip, **gates(full, 0.0, ["Conv_0", "Gemm_7"])),
                               atol=1e-5, rtol=0)


def test_unknown_layer_names_are_errors():
    _, full, _ = compensated_digits()
    with pytest.raises(PassError, match="SelectCompensationPass: no compensation candidate for layer.s. conv9, relu1"):
        SelectCompensationPass(["conv1", "relu1", "conv9"])(full)
