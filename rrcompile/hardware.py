"""The hardware cost of a model: analog crossbar tiles per layer, digital compensation overhead, and
what calibrating each chip takes; a deployed model carries it as JSON in its metadata
(``rrcompile.hardware``).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import onnx

from rrcompile.compensation import candidates
from rrcompile.graph import analog_layers

DEFAULT_TILE = 128  # crossbar tile side (rows = columns) when none is given: the CLI's --tile and every API default

METADATA_KEY = "rrcompile.hardware"


@dataclasses.dataclass(frozen=True)
class CalibrationSlot:
    layer: str
    rank: int
    per_chip_weights: int  # up, gain and offset: solved again for every chip


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
    calibration_slots: tuple[CalibrationSlot, ...] = ()
    calibration_images: int | None = None  # per chip, when known (compile records it)
    calibration_seconds: float | None = None  # per chip on the compiling machine, when measured

    @classmethod
    def of(cls, model: onnx.ModelProto, tile: int = DEFAULT_TILE, *, calibration_images: int | None = None,
           calibration_seconds: float | None = None) -> "HardwareReport":
        layers = tuple(
            LayerHardware(layer.node, layer.op, layer.weight_shape, layer.params, layer.rows, layer.cols, layer.tiles(tile))
            for layer in analog_layers(model)
        )
        sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
        slots = tuple(CalibrationSlot(c.layer, c.rank, sizes[c.up] + sizes[c.gain] + sizes[c.offset])
                      for c in candidates(model) if c.calibrated)
        return cls(layers, sum(c.weights for c in candidates(model)), tile, slots,
                   calibration_images if slots else None, calibration_seconds if slots else None)

    @property
    def per_chip_weights(self) -> int:
        return sum(slot.per_chip_weights for slot in self.calibration_slots)

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
            "calibration": {
                "slots": [dataclasses.asdict(slot) for slot in self.calibration_slots],
                "per_chip_weights": self.per_chip_weights,
                "images": self.calibration_images,
                "seconds_per_chip": self.calibration_seconds,
            } if self.calibration_slots else None,
        }

    @classmethod
    def from_model(cls, model: onnx.ModelProto) -> dict | None:
        """The report a deployed model carries in its metadata, as a dict (None if it carries none)."""
        entry = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
        return json.loads(entry) if entry else None

    def calibration_rows(self) -> list[list[str]]:
        return [[slot.layer, str(slot.rank), f"{slot.per_chip_weights:,}"] for slot in self.calibration_slots]
