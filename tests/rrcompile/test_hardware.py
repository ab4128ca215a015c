"""The hardware report: tiles per layer, and ADC conversions and energy per inference from the stated model."""
from __future__ import annotations

import onnx
import pytest
from conftest import DIGITS_MODEL

from rrcompile.crossbar import with_adc_ranges
from rrcompile.deploy import deploy
from rrcompile.devices import parse_device
from rrcompile.hardware import ADC_FOM, HardwareReport
from rrcompile.pipeline import canonicalize


@pytest.fixture(scope="module")
def digits():
    import numpy as np

    return canonicalize(onnx.load(str(DIGITS_MODEL))), np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)


def test_adc_conversions_and_energy_per_inference(digits):
    model, x = digits
    device = with_adc_ranges(model, parse_device("tile:size=64,cols=16+adc:bits=6"), x)
    report = HardwareReport.of(deploy(model, device=device)[0])
    # conv: row tiles x columns x output positions (8x8, padded); dense: row tiles x columns
    assert [(layer.tiles, layer.adc_conversions) for layer in report.layers] == [
        (1, 1 * 8 * 64), (2, 2 * 16 * 64), (4 * 2, 4 * 32), (1, 10)]
    assert ADC_FOM == pytest.approx(3.1e-3 / 1.2e9 / 256)  # Kull et al.: 3.1 mW, 1.2 GS/s, 8 bits
    energy = (512 + 2048 + 128 + 10) * ADC_FOM * 2 ** 6 * 1e12
    assert report.adc_energy_pj == pytest.approx(energy)
    adc = report.to_dict()["adc"]
    assert adc["energy_per_extra_bit_pj"] == pytest.approx(energy) and adc["energy_saved_per_bit_removed_pj"] == pytest.approx(energy / 2)
    assert report.adc_rows()[-1] == ["total", "", "2,698", f"{energy / 1e3:,.3f}"]
    eight = HardwareReport.of(deploy(model, device=with_adc_ranges(model, parse_device("tile:size=64,cols=16+adc:bits=8"), x))[0])
    assert eight.adc_energy_pj == pytest.approx(4 * energy)  # two bits more: four times the energy


def test_layers_without_an_adc_term_report_no_conversions(digits):
    model, x = digits
    device = parse_device("tile:size=64")
    report = HardwareReport.of(deploy(model, device=device)[0], tile=32)
    assert not report.adc_layers and report.to_dict()["adc"] is None
    assert [(layer.tile_rows, layer.tiles) for layer in report.layers] == [(64, 1), (64, 2), (64, 4), (64, 1)]
    plain = HardwareReport.of(model, tile=32)  # no tiles in the graph: tile x tile arrays
    assert [(layer.tile_rows, layer.tiles) for layer in plain.layers] == [(32, 1), (32, 3), (32, 8), (32, 1)]
