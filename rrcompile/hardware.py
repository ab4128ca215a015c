"""The hardware cost of a model: analog crossbar tiles per layer, its ADCs (conversions and energy
per inference), digital compensation overhead, and what calibrating each chip takes; a deployed
model carries it as JSON in its metadata (``rrcompile.hardware``).

ADC energy: a conversion of ``B`` bits costs ``E = FOM * 2^B`` (Walden's figure of merit, R. H.
Walden, "Analog-to-digital converter survey and analysis", IEEE JSAC 17(4), 1999; the FOM that B.
Murmann's "ADC Performance Survey", github.com/bmurmann/ADC-survey, tabulates for every published
converter), with the nominal bits taken as the effective ones. ``ADC_FOM`` comes from the
converter ISAAC's crossbars use (Shafiee et al., ISCA 2016): Kull et al., "A 3.1 mW 8b 1.2 GS/s
single-channel asynchronous SAR ADC ...", IEEE JSSC 48(12), 2013: 3.1 mW / 1.2 GS/s = 2.58 pJ per
8-bit conversion, 2.58 pJ / 2^8 = 10.1 fJ per level. So each extra bit doubles a converter's energy;
below about 6 bits real converters save less than the model says (fixed comparator and logic
costs dominate, which the survey's data show as a floor).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import ClassVar

import onnx

from rrcompile.compensation import candidates
from rrcompile.crossbar import Tiling, untile
from rrcompile.devices import crossbar_models, simulated_device
from rrcompile.graph import analog_layers, tensor_shapes

DEFAULT_TILE = 128  # crossbar tile side (rows = columns) when none is given: the CLI's --tile and every API default
ADC_FOM = 3.1e-3 / 1.2e9 / 2 ** 8  # joules per conversion level (Walden FOM, nominal bits): see the module docstring

METADATA_KEY = "rrcompile.hardware"


@dataclasses.dataclass(frozen=True)
class CalibrationSlot:
    layer: str
    rank: int
    # down, up, gain and offset: solved again for every chip (rrcompile.calibrate's default; with
    # CalibrationConfig(projection="compiled") the down projection is fixed and this overcounts it)
    per_chip_weights: int


@dataclasses.dataclass(frozen=True)
class LayerHardware:
    name: str
    op: str
    weight_shape: tuple[int, ...]
    params: int
    rows: int
    cols: int
    tiles: int
    tile_rows: int  # one array's rows and columns
    tile_cols: int
    adc_bits: int | None = None  # None: the layer's readout is not modelled (no adc term)
    adc_conversions: int | None = None  # per inference (one input sample): row tiles x columns x output positions
    adc_energy_pj: float | None = None  # per inference: conversions x ADC_FOM x 2^bits

    @property
    def grid(self) -> str:
        """The layer's arrays, row tiles x column tiles."""
        return f"{math.ceil(self.rows / self.tile_rows)}x{math.ceil(self.cols / self.tile_cols)}"


@dataclasses.dataclass(frozen=True)
class HardwareReport:
    """Analog crossbar use and digital compensation overhead of a model."""

    HEADERS: ClassVar[tuple[str, ...]] = ("layer", "op", "weight", "params", "rows x cols", "tiles")
    ADC_HEADERS: ClassVar[tuple[str, ...]] = ("layer", "ADC bits", "conversions / inference", "ADC energy / inference (nJ)")

    layers: tuple[LayerHardware, ...]
    digital_weights: int  # compensation weights, on reliable digital logic
    tile: int  # crossbar tiles are tile x tile cells
    calibration_slots: tuple[CalibrationSlot, ...] = ()
    calibration_images: int | None = None  # per chip, when known (compile records it)
    calibration_seconds: float | None = None  # per chip on the compiling machine, when measured

    @classmethod
    def of(cls, model: onnx.ModelProto, tile: int = DEFAULT_TILE, *, calibration_images: int | None = None,
           calibration_seconds: float | None = None) -> "HardwareReport":
        """The report of ``model``; a layer the graph runs on tiles and ADCs (a deployed graph that
        keeps them) counts its own arrays and conversions, any other ``tile`` x ``tile`` arrays."""
        crossbar = simulated_device(model)
        untiled = model
        if crossbar is not None:  # counted on the layer as written: its output shape is the layer's own
            untiled = onnx.ModelProto.FromString(model.SerializeToString())
            untile(untiled)
        terms = {layer.node: crossbar_models(crossbar.for_layer(layer.node, layer.weight)) if crossbar else (None, None)
                 for layer in analog_layers(untiled)}
        shapes = tensor_shapes(untiled) if any(adc for _, adc in terms.values()) else {}
        outputs = {n.name: n.output[0] for n in untiled.graph.node}
        layers = []
        for layer in analog_layers(untiled):
            tile_term, adc = terms[layer.node]
            size, cols = (tile_term.values["size"], tile_term.values["cols"]) if tile_term else (tile, tile)
            tiles = math.ceil(layer.rows / size) * math.ceil(layer.cols / cols)
            conversions = energy = bits = None
            if adc is not None:
                bits = adc.values["bits"]
                shape = shapes.get(outputs[layer.node])
                if shape is not None and all(isinstance(d, int) and d > 0 for d in shape[1:]):
                    positions = math.prod(shape[2:]) if layer.op == "Conv" else math.prod(shape[1:-1])
                    conversions = Tiling.of(layer, tile_term).tiles * layer.cols * positions
                    energy = conversions * ADC_FOM * 2 ** bits * 1e12
            layers.append(LayerHardware(layer.node, layer.op, layer.weight_shape, layer.params, layer.rows, layer.cols,
                                        tiles, size, cols, bits, conversions, energy))
        layers = tuple(layers)
        sizes = {t.name: math.prod(t.dims) for t in model.graph.initializer}
        slots = tuple(CalibrationSlot(c.layer, c.rank, sizes[c.down] + sizes[c.up] + sizes[c.gain] + sizes[c.offset])
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

    @property
    def adc_layers(self) -> tuple[LayerHardware, ...]:
        """The layers whose ADCs the report counts (conversions known)."""
        return tuple(layer for layer in self.layers if layer.adc_conversions is not None)

    @property
    def adc_conversions(self) -> int:
        return sum(layer.adc_conversions for layer in self.adc_layers)

    @property
    def adc_energy_pj(self) -> float:
        """ADC energy per inference; one more bit on every converter doubles it."""
        return sum(layer.adc_energy_pj for layer in self.adc_layers)

    def adc_rows(self) -> list[list[str]]:
        """One row per layer with ADCs under :attr:`ADC_HEADERS`, then a total."""
        return [
            *([layer.name, str(layer.adc_bits), f"{layer.adc_conversions:,}", f"{layer.adc_energy_pj / 1e3:,.3f}"]
              for layer in self.adc_layers),
            ["total", "", f"{self.adc_conversions:,}", f"{self.adc_energy_pj / 1e3:,.3f}"],
        ]

    def adc_summary(self) -> str:
        """What the bits cost, in one line under the ADC table."""
        return (f"energy per conversion = {ADC_FOM * 1e15:.1f} fJ x 2^bits (Walden FOM of ISAAC's 8-bit SAR ADC, "
                f"Kull et al. 2013): one more bit on every ADC costs {self.adc_energy_pj / 1e3:,.3f} nJ per inference "
                f"more, one fewer saves {self.adc_energy_pj / 2e3:,.3f} nJ")

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
            "adc": {
                "conversions_per_inference": self.adc_conversions,
                "energy_per_inference_pj": self.adc_energy_pj,
                "energy_per_extra_bit_pj": self.adc_energy_pj,  # 2^(B+1) - 2^B = 2^B: one more bit doubles it
                "energy_saved_per_bit_removed_pj": self.adc_energy_pj / 2,
                "model": "energy per conversion = fom_j * 2^bits (Walden FOM, nominal bits)",
                "fom_j": ADC_FOM,
                "source": "Kull et al., IEEE JSSC 48(12) 2013 (3.1 mW, 8 b, 1.2 GS/s SAR ADC, ISAAC's converter)",
            } if self.adc_layers else None,
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
