"""TagHardwarePass: every node says where it runs; the model carries its hardware report."""
from __future__ import annotations

import json

import onnx
import pytest
from conftest import DIGITS_MODEL

from rrcompile.devices import parse_device
from rrcompile.errors import PassError
from rrcompile.hardware import METADATA_KEY, HardwareReport
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.tag_hardware import TagHardwarePass
from rrcompile.pipeline import canonicalize


def test_tags_follow_the_tile_size_and_metadata_is_replaced_not_repeated():
    model = InsertCompensationCandidatesPass(rank=2)(canonicalize(onnx.load(str(DIGITS_MODEL)))).model
    tagged = TagHardwarePass(tile=16)(TagHardwarePass(tile=128)(model).model).model
    tags = {n.name: n.doc_string for n in tagged.graph.node}
    assert tags["fc1"] == "rrcompile: analog crossbar, 16x2 tiles of 16x16 (rows x cols 256x32)"  # Gemm transB=1: [32, 256]
    assert tags["conv2"] == "rrcompile: analog crossbar, 5x1 tiles of 16x16 (rows x cols 72x16)"
    assert tags["fc1.compensation"] == "rrcompile: digital (compensation)"
    assert tags["relu1"] == "rrcompile: digital"
    assert [p.key for p in tagged.metadata_props].count(METADATA_KEY) == 1
    stored = json.loads(next(p.value for p in tagged.metadata_props if p.key == METADATA_KEY))
    assert stored == json.loads(json.dumps(HardwareReport.of(model, 16).to_dict()))
    assert stored["tile"] == 16 and stored["total_tiles"] == 1 + 5 + 32 + 2  # conv1 9x8, conv2 72x16, fc1 256x32, fc2 32x10


def test_a_simulation_graph_is_rejected():
    varied = InsertVariationPass(parse_device("lognormal:sigma=0.5"))(canonicalize(onnx.load(str(DIGITS_MODEL)))).model
    with pytest.raises(PassError, match="run StripSimulationPass first"):
        TagHardwarePass()(varied)
