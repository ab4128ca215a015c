"""deploy: the chip's graph passes the full ONNX check, runs in plain onnxruntime, and reports its cost."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_MODEL, run, with_up_weights

from rrcompile.compensation import candidates
from rrcompile.deploy import deploy
from rrcompile.devices import parse_device
from rrcompile.hardware import METADATA_KEY
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.select_compensation import SelectCompensationPass
from rrcompile.pipeline import canonicalize


@pytest.fixture
def digits() -> tuple[onnx.ModelProto, onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    """(canonical, compensated with conv2 and fc1 kept at rank 2, the same varied) digits CNN, and an input."""
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    compensated = with_up_weights(SelectCompensationPass(["conv2", "fc1"])(InsertCompensationCandidatesPass(rank=2)(model).model).model)
    varied = InsertVariationPass(parse_device("quantize:levels=32+lognormal:sigma=0.5+read:eta=0.01"))(compensated).model
    return model, compensated, varied, np.random.default_rng(0).random((6, 1, 8, 8), dtype=np.float32)


def test_deployed_model_runs_in_plain_onnxruntime_and_every_node_is_tagged(digits):
    model, compensated, varied, x = digits
    deployed, _ = deploy(varied)
    onnx.checker.check_model(deployed, full_check=True)
    session = ort.InferenceSession(deployed.SerializeToString(), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["image"] and not session.get_overridable_initializers()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], run(compensated, x), atol=1e-5, rtol=0)
    tags = {n.name: n.doc_string for n in deployed.graph.node}
    assert all(tag.startswith("rrcompile: ") for tag in tags.values())
    assert tags["conv1"] == "rrcompile: analog crossbar, 1x1 tiles of 128x128 (rows x cols 9x8)"
    assert tags["fc1"] == "rrcompile: analog crossbar, 2x1 tiles of 128x128 (rows x cols 256x32)"
    assert tags["conv2.compensation"] == tags["fc1.compensation"] == "rrcompile: digital (compensation)"
    assert tags["pool"] == "rrcompile: digital"


def test_report_counts_analog_and_digital_weights(digits):
    _, _, varied, _ = digits
    deployed, report = deploy(varied, tile=64)
    assert [(layer.name, layer.weight_shape, layer.rows, layer.cols, layer.tiles) for layer in report.layers] == [
        ("conv1", (8, 1, 3, 3), 9, 8, 1), ("conv2", (16, 8, 3, 3), 72, 16, 2),
        ("fc1", (32, 256), 256, 32, 4), ("fc2", (10, 32), 32, 10, 1),
    ]
    analog = 8 * 9 + 16 * 72 + 32 * 256 + 10 * 32
    digital = (2 * 8 * 3 * 3 + 16 * 2) + 2 * (256 + 32)  # conv2: Wd [2, 8, 3, 3] + Wu [16, 2, 1, 1]; fc1: rank 2
    assert (report.analog_weights, report.digital_weights, report.total_tiles, report.tile) == (analog, digital, 8, 64)
    assert report.digital_weights == sum(c.weights for c in candidates(deployed))
    assert report.overhead_percent == pytest.approx(100 * digital / analog)
    assert report.rows()[-1] == ["total", "", "", str(analog), "", "8"]
    assert report.rows()[1] == ["conv2", "Conv", "16x8x3x3", "1152", "72x16", "2"]
    stored = json.loads(next(p.value for p in deployed.metadata_props if p.key == METADATA_KEY))
    assert stored["overhead_percent"] == pytest.approx(100 * digital / analog)
    assert stored == json.loads(json.dumps(report.to_dict()))


def test_deploy_keeps_tiles_and_noiseless_adcs_with_their_ranges(digits):
    from rrcompile.crossbar import with_adc_ranges
    from rrcompile.devices import noise_inputs, simulated_device, stored_adc_ranges

    model, compensated, _, x = digits
    train = np.random.default_rng(1).random((64, 1, 8, 8), dtype=np.float32)
    device = with_adc_ranges(model, parse_device("tile:size=64+adc:bits=6,noise=0.02+lognormal:sigma=0.5"), train)
    deployed, report = deploy(InsertVariationPass(device)(compensated).model, device=device)
    onnx.checker.check_model(deployed, full_check=True)
    assert [i.name for i in deployed.graph.input] == ["image"]
    assert {k: v.tolist() for k, v in stored_adc_ranges(deployed).items()} == {k: v.tolist() for k, v in device.adc_ranges.items()}
    assert [m.spec() for m in simulated_device(deployed).layers["fc1"]] == ["tile:size=64,cols=64", "adc:bits=6"]
    # it computes the ideal chip: the simulation at sigma 0 without ADC noise, on the same converters
    ideal = InsertVariationPass(dataclasses.replace(parse_device("tile:size=64+adc:bits=6+lognormal:sigma=0"),
                                                    adc_ranges=device.adc_ranges))(compensated).model
    expected = run(ideal, x, **{n.name: np.zeros(n.shape, np.float32) for n in noise_inputs(ideal)})
    assert np.abs(run(deployed, x) - expected).max() <= 1e-5
    tags = {n.name: n.doc_string for n in deployed.graph.node}
    assert tags["fc1"] == "rrcompile: analog crossbar, 4x1 tiles of 64x64 (rows x cols 256x32)"
    assert tags["fc1.adc"].startswith("rrcompile: ADC, 6 bits") and tags["fc1.tile_sum"] == "rrcompile: digital"
    assert [layer.adc_conversions for layer in report.layers] == [8 * 64, 2 * 16 * 64, 4 * 32, 10]
    # deployed again (rrcompile deploy of a deployed graph, or of its simulation graph): the same graph
    again, _ = deploy(deployed, device=device)
    from_simulation, _ = deploy(InsertVariationPass(device)(compensated).model)
    for other in (again, from_simulation):
        assert np.abs(run(other, x) - run(deployed, x)).max() == 0
        assert sorted(f.name for f in other.functions) == sorted(f.name for f in deployed.functions)


def test_a_16_bit_deployed_crossbar_keeps_the_clean_outputs(digits):
    from rrcompile.crossbar import with_adc_ranges

    model, _, _, x = digits
    device = with_adc_ranges(model, parse_device("tile:size=16+adc:bits=16"), x)
    clean = run(model, x)
    assert np.abs(run(deploy(model, device=device)[0], x) - clean).max() <= 1e-4 * np.abs(clean).max()
