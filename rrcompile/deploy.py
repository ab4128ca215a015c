"""Deployment: the graph a chip runs, tagged with where each node executes, and its hardware cost.

    deployed, report = deploy(compensated_model, tile=128)

``deploy`` strips the simulation (variation ops, noise inputs; compensation gates become constants)
and tags every node: analog layers with their crossbar tiles, compensation and everything else as
digital. The :class:`HardwareReport` is also stored in the model's metadata as JSON
(``rrcompile.hardware``), so the file carries its own cost.
"""
from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import onnx

from rrcompile.compensation import candidates
from rrcompile.graph import analog_layers
from rrcompile.pass_manager import PassManager
from rrcompile.passes.strip_simulation import StripSimulationPass

METADATA_KEY = "rrcompile.hardware"


@dataclasses.dataclass(frozen=True)
class LayerHardware:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    params: int
    rows: int
    cols: int
    tiles: int


@dataclasses.dataclass(frozen=True)
class HardwareReport:
    """Analog crossbar use and digital compensation overhead of a model."""

    HEADERS: ClassVar[tuple[str, ...]] = ("layer", "op", "weight", "params", "rows x cols", "tiles")

    layers: tuple[LayerHardware, ...]
    digital_weights: int  # compensation weights, on reliable digital logic
    tile: int  # crossbar tiles are tile x tile cells

    @classmethod
    def of(cls, model: onnx.ModelProto, tile: int = 128) -> "HardwareReport":
        layers = tuple(
            LayerHardware(layer.node, layer.op, layer.weight_shape, layer.params, layer.rows, layer.cols, layer.tiles(tile))
            for layer in analog_layers(model)
        )
        return cls(layers, sum(c.weights for c in candidates(model)), tile)

    @property
    def analog_weights(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def overhead_percent(self) -> float:
        """Digital weights as a percentage of analog weights."""
        return 100 * self.digital_weights / self.analog_weights if self.analog_weights else math.nan

    @property
    def total_tiles(self) -> int:
        return sum(layer.tiles for layer in self.layers)

    def rows(self) -> list[list[str]]:
        """One row per analog layer under :attr:`HEADERS`, then a total."""
        return [
            *([layer.name, layer.op, "x".join(map(str, layer.weight_shape)), str(layer.params),
               f"{layer.rows}x{layer.cols}", str(layer.tiles)] for layer in self.layers),
            ["total", "", "", str(self.analog_weights), "", str(self.total_tiles)],
        ]

    def to_dict(self) -> dict:
        return {
            "tile": self.tile,
            "layers": [dataclasses.asdict(layer) for layer in self.layers],
            "analog_weights": self.analog_weights,
            "digital_weights": self.digital_weights,
            "overhead_percent": self.overhead_percent,
            "total_tiles": self.total_tiles,
        }


def deploy(model: onnx.ModelProto, tile: int = 128) -> tuple[onnx.ModelProto, HardwareReport]:
    """The chip's graph of a (varied, compensated) model: StripSimulationPass then TagHardwarePass."""
    # imported here: TagHardwarePass builds its metadata from this module's HardwareReport
    from rrcompile.passes.tag_hardware import TagHardwarePass

    deployed = PassManager([StripSimulationPass(), TagHardwarePass(tile)])(model).model
    return deployed, HardwareReport.of(deployed, tile)
