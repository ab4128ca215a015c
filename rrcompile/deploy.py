"""Deployment: the graph a chip runs, tagged with where each node executes, and its hardware cost.

    deployed, report = deploy(compensated_model)  # crossbar tiles of DEFAULT_TILE x DEFAULT_TILE cells

``deploy`` strips the simulation (variation ops, noise inputs; compensation gates become constants)
and tags every node: analog layers with their crossbar tiles, compensation and everything else as
digital. A device with ``tile`` and ``adc`` terms stays in the graph as the ideal chip computes it
(:meth:`DeviceConfig.hardware`: every tile's partial sums through its ADC, with the ADC ranges
fixed at compile time as ``<layer>.adc_range`` initializers, then summed digitally; no weight
effect, no ADC noise), so the file carries its converters' settings and onnxruntime runs what the
converters give; ``rrcompile evaluate`` and ``calibrate`` read the ranges back. The :class:`~rrcompile.hardware.HardwareReport` is also stored in the model's metadata as JSON
(``rrcompile.hardware``), so the file carries its own cost, including what calibrating each chip
takes (its slots' per-chip weights, the images, the seconds); the device the model was compiled
for goes in ``rrcompile.device``, so ``rrcompile calibrate`` simulates that device by default.
"""
from __future__ import annotations

import dataclasses
import json

import onnx

from rrcompile.devices import DeviceConfig, simulated_device
from rrcompile.graph import keep_where
from rrcompile.hardware import DEFAULT_TILE, HardwareReport
from rrcompile.pass_manager import PassManager
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.passes.tag_hardware import TagHardwarePass

DEVICE_KEY = "rrcompile.device"


def deploy(model: onnx.ModelProto, tile: int = DEFAULT_TILE, *, device: DeviceConfig | None = None,
           calibration_images: int | None = None, calibration_seconds: float | None = None,
           ) -> tuple[onnx.ModelProto, HardwareReport]:
    """The chip's graph of a (varied, compensated) model: StripSimulationPass, the crossbar terms put
    back (InsertVariationPass with ``device.hardware()``), then TagHardwarePass; ``device`` (the one
    compiled for) and the calibration facts go into the metadata. Without ``device``, the crossbar
    is the one the model itself runs on (a simulation graph's or a deployed graph's); the ADC
    ranges are the device's, else those the model stores."""
    own = simulated_device(model)
    crossbar = device if device is not None else own
    passes = [StripSimulationPass()]
    if crossbar is not None and crossbar.crossbar:
        ranges = {**(own.adc_ranges if own is not None else {}), **crossbar.adc_ranges}
        passes.append(InsertVariationPass(dataclasses.replace(crossbar.hardware(), adc_ranges=ranges)))
    passes.append(TagHardwarePass(tile, calibration_images=calibration_images, calibration_seconds=calibration_seconds))
    deployed = PassManager(passes)(model).model
    if device is not None:
        keep_where(deployed.metadata_props, lambda p: p.key != DEVICE_KEY)
        deployed.metadata_props.add(key=DEVICE_KEY, value=json.dumps(device.to_dict()))
    return deployed, HardwareReport.of(deployed, tile, calibration_images=calibration_images,
                                       calibration_seconds=calibration_seconds)


def compiled_device(model: onnx.ModelProto) -> DeviceConfig | None:
    """The device a deployed model was compiled for (its ``rrcompile.device`` metadata), if recorded."""
    entry = next((p.value for p in model.metadata_props if p.key == DEVICE_KEY), None)
    return None if entry is None else DeviceConfig.from_dict(json.loads(entry), DEVICE_KEY)
