"""Deployment: the graph a chip runs, tagged with where each node executes, and its hardware cost.

    deployed, report = deploy(compensated_model)  # crossbar tiles of DEFAULT_TILE x DEFAULT_TILE cells

``deploy`` strips the simulation (variation ops, noise inputs; compensation gates become constants)
and tags every node: analog layers with their crossbar tiles, compensation and everything else as
digital. The :class:`~rrcompile.hardware.HardwareReport` is also stored in the model's metadata as JSON
(``rrcompile.hardware``), so the file carries its own cost, including what calibrating each chip
takes (its slots' per-chip weights, the images, the seconds); the device the model was compiled
for goes in ``rrcompile.device``, so ``rrcompile calibrate`` simulates that device by default.
"""
from __future__ import annotations

import json

import onnx

from rrcompile.devices import DeviceConfig
from rrcompile.graph import keep_where
from rrcompile.hardware import DEFAULT_TILE, HardwareReport
from rrcompile.pass_manager import PassManager
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.passes.tag_hardware import TagHardwarePass

DEVICE_KEY = "rrcompile.device"


def deploy(model: onnx.ModelProto, tile: int = DEFAULT_TILE, *, device: DeviceConfig | None = None,
           calibration_images: int | None = None, calibration_seconds: float | None = None,
           ) -> tuple[onnx.ModelProto, HardwareReport]:
    """The chip's graph of a (varied, compensated) model: StripSimulationPass then TagHardwarePass;
    ``device`` (the one compiled for) and the calibration facts go into the metadata."""
    deployed = PassManager([StripSimulationPass(), TagHardwarePass(tile, calibration_images=calibration_images,
                                                                   calibration_seconds=calibration_seconds)])(model).model
    if device is not None:
        keep_where(deployed.metadata_props, lambda p: p.key != DEVICE_KEY)
        deployed.metadata_props.add(key=DEVICE_KEY, value=json.dumps(device.to_dict()))
    return deployed, HardwareReport.of(deployed, tile, calibration_images=calibration_images,
                                       calibration_seconds=calibration_seconds)


def compiled_device(model: onnx.ModelProto) -> DeviceConfig | None:
    """The device a deployed model was compiled for (its ``rrcompile.device`` metadata), if recorded."""
    entry = next((p.value for p in model.metadata_props if p.key == DEVICE_KEY), None)
    return None if entry is None else DeviceConfig.from_dict(json.loads(entry), DEVICE_KEY)
