"""StripSimulationPass: a varied, compensated graph becomes the unvaried compensated graph."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import gates, run, with_up_weights
from graph_builders import QUIRK_MODELS
from onnx import numpy_helper

from rrcompile.devices import BY_OP_TYPE, noise_inputs, parse_device
from rrcompile.graph import RRCOMPILE_DOMAIN
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.pipeline import canonicalize

DEVICE = "quantize:levels=16+lognormal:sigma=0.5+programming:eta=0.02+stuck:p_off=0.01,p_on=0.01+read:eta=0.01"


@pytest.mark.parametrize("name", sorted(QUIRK_MODELS))
@pytest.mark.parametrize("variation_first", [True, False], ids=["varied_then_compensated", "compensated_then_varied"])
def test_stripped_graph_is_the_unvaried_compensated_graph(name, variation_first):
    original, x = QUIRK_MODELS[name]()
    model = canonicalize(original)
    compensated = with_up_weights(InsertCompensationCandidatesPass()(model).model)
    vary = InsertVariationPass(parse_device(DEVICE))
    if variation_first:
        both = with_up_weights(InsertCompensationCandidatesPass()(vary(model).model).model)
    else:
        both = vary(compensated).model
    assert noise_inputs(both)
    stripped = StripSimulationPass()(both).model
    onnx.checker.check_model(stripped, full_check=True)
    assert not [n for n in stripped.graph.node if n.op_type in BY_OP_TYPE or ".weight_" in n.name]
    assert [i.name for i in stripped.graph.input] == [i.name for i in model.graph.input]
    assert sorted(f.name for f in stripped.functions) == sorted(f.name for f in compensated.functions)
    # rtol: cntk_conv_add_matmul's raw 0..255 input gives outputs near 100, a gate fed or folded rounds apart
    np.testing.assert_allclose(run(stripped, x), run(compensated, x), atol=1e-5, rtol=1e-6)


def test_gate_values_become_constants():
    original, x = QUIRK_MODELS["mlp_matmul_chain"]()
    compensated = with_up_weights(InsertCompensationCandidatesPass()(canonicalize(original)).model)
    for tensor in compensated.graph.initializer:
        if tensor.name == "dense2.compensation_gate":
            tensor.CopyFrom(numpy_helper.from_array(np.array(0.0, np.float32), tensor.name))
    stripped = StripSimulationPass()(compensated).model
    assert len(stripped.graph.input) == 1
    assert {t.name for t in stripped.graph.initializer} >= set(gates(compensated, 1.0))
    np.testing.assert_allclose(run(stripped, x), run(compensated, x), atol=1e-5, rtol=0)
    np.testing.assert_allclose(run(stripped, x), run(compensated, x, **gates(compensated, 0.0, ["dense2"])), atol=1e-5, rtol=0)


def test_varied_model_without_compensation_loses_the_domain_and_plain_model_is_untouched():
    original, x = QUIRK_MODELS["cntk_conv_add_matmul"]()
    model = canonicalize(original)
    stripped = StripSimulationPass()(InsertVariationPass(parse_device("lognormal:sigma=0.5"))(model).model).model
    assert not stripped.functions and RRCOMPILE_DOMAIN not in [o.domain for o in stripped.opset_import]
    np.testing.assert_allclose(run(stripped, x), run(model, x), atol=1e-5, rtol=0)
    assert StripSimulationPass()(model).modified is False
