"""RRAM device models and the ``ai.rrcompile`` ONNX functions that simulate them.

Each model acts on one analog layer's weight matrix ``W`` with range ``R = max|W|`` (the layer's
conductance range, taken from the programmed weight). A layer's models always apply in physical
order, whatever order they were written in: quantize (the programming target) -> log-normal
variation -> programming noise -> stuck-at faults -> read noise.

Randomness never lives inside the graph: every stochastic model reads a standard-normal or
uniform tensor shaped like ``W`` as an extra graph input, which the Monte Carlo evaluator draws
from its seeded generator. One draw of the per-chip tensors is one simulated chip; read noise is
drawn again for every inference (every ``session.run``).

Two more kinds of term describe the crossbar a layer runs on rather than a weight effect
(:class:`CrossbarModel`): ``tile`` (the layer split over arrays of ``size`` rows, partial sums per
array, digital accumulation) and ``adc`` (each array's column outputs clipped to a range and
quantized before the accumulation). They change the layer's computation, not its weight; their
ONNX functions, numpy references and torch versions are in :mod:`rrcompile.crossbar`.

torch is imported inside the ``apply_torch`` methods only: the evaluator and the passes use this
module without it, and importing torch costs seconds.
"""
from __future__ import annotations

import abc
import dataclasses
import fnmatch
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from rrcompile.errors import DeviceSpecError
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, is_analog_op, producers, variation_chain

if TYPE_CHECKING:
    import torch

FUNCTION_OPSET = 1  # version of the ai.rrcompile domain


@dataclasses.dataclass(frozen=True)
class Noise:
    distribution: Literal["normal", "uniform"]
    per: Literal["chip", "inference"]

    def draw(self, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
        if self.distribution == "normal":
            return rng.standard_normal(shape, dtype=np.float32)
        return rng.random(shape, dtype=np.float32)


def _param(name: str, output: str, *, integer: bool = False) -> onnx.NodeProto:
    """A Constant node inside a function body whose value is the function call's attribute ``name``."""
    node = helper.make_node("Constant", [], [output])
    if integer:
        node.attribute.append(onnx.AttributeProto(name="value_int", ref_attr_name=name, type=onnx.AttributeProto.INT))
    else:
        node.attribute.append(onnx.AttributeProto(name="value_float", ref_attr_name=name, type=onnx.AttributeProto.FLOAT))
    return node


def _const(value: float, output: str) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [output], value_float=value)


class DeviceTerm:
    """One ``kind:param=value`` term of a device spec: its parameters, their checks and its spec."""

    kind: ClassVar[str]  # name in device specs
    order: ClassVar[int]  # physical order of application within a layer
    params: ClassVar[tuple[str, ...]]  # numeric parameters, all required unless in ``defaults`` or ``optional``
    defaults: ClassVar[dict[str, float]] = {}
    optional: ClassVar[tuple[str, ...]] = ()  # parameters whose default ``validate`` derives from the others
    noise: ClassVar[Noise | None] = None  # a weight-shaped random tensor it reads, if any

    def __init__(self, **values: float):
        self.values = {**self.defaults, **values}
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    @classmethod
    def accepted(cls) -> tuple[str, ...]:
        """The parameter names a spec may give."""
        return cls.params

    @classmethod
    def from_spec(cls, raw: dict[str, str], term: str) -> "DeviceTerm":
        """The term from its spec's ``key -> value text`` (keys already checked against :meth:`accepted`)."""
        values: dict[str, float] = {}
        for key, value in raw.items():
            try:
                values[key] = float(value)
            except ValueError:
                raise DeviceSpecError(f"device '{cls.kind}': {key}={value!r} is not a number") from None
        missing = [p for p in cls.params if p not in values and p not in cls.defaults and p not in cls.optional]
        if missing:
            raise DeviceSpecError(f"device '{cls.kind}': missing {', '.join(missing)} in '{term}'")
        return cls(**values)

    @property
    def is_identity(self) -> bool:
        """True when the parameters switch the effect off (sigma = 0 and the like)."""
        return all(self.values[p] == 0 for p in self.params)

    def with_values(self, **values: float) -> "DeviceTerm":
        return type(self)(**{**self.values, **values})

    def spec(self) -> str:
        return f"{self.kind}:" + ",".join(f"{k}={self.values[k]:g}" for k in self.params)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.values == self.values

    def __repr__(self) -> str:
        return self.spec()

    def _check_range(self, name: str, low: float, high: float = float("inf")) -> None:
        value = self.values[name]
        if not math.isfinite(value):
            raise DeviceSpecError(f"device '{self.kind}': {name}={value:g} must be a finite number")
        if not low <= value <= high:
            bound = f">= {low:g}" if high == float("inf") else f"in [{low:g}, {high:g}]"
            raise DeviceSpecError(f"device '{self.kind}': {name}={value:g} must be {bound}")

    def _check_integer(self, name: str, low: int, high: int) -> None:
        value = self.values[name]
        if not math.isfinite(value) or value != int(value) or not low <= value <= high:
            raise DeviceSpecError(f"device '{self.kind}': {name}={value:g} must be an integer in [{low}, {high}]")
        self.values[name] = int(value)


class DeviceModel(DeviceTerm, abc.ABC):
    """One physical effect on the programmed conductances of a layer."""

    op_type: ClassVar[str]  # function name in the ai.rrcompile domain

    @abc.abstractmethod
    def validate(self) -> None: ...

    @classmethod
    @abc.abstractmethod
    def body(cls) -> tuple[list[str], list[onnx.NodeProto]]:
        """(input names, nodes) of the function; output is ``Y``; params are attributes."""

    @abc.abstractmethod
    def apply(self, w: np.ndarray, w_range: float, noise: np.ndarray | None) -> np.ndarray:
        """Numpy reference of the function, used to test the ONNX and torch versions."""

    @abc.abstractmethod
    def apply_torch(self, w: "torch.Tensor", w_range: "torch.Tensor | None", noise: "torch.Tensor | None") -> "torch.Tensor":
        """The same function in torch, differentiable in ``w``, for variation-aware training."""

    @classmethod
    def reads_range(cls) -> bool:
        """Whether the function takes the layer range ``R`` as its second input."""
        return "R" in cls.body()[0]

    @classmethod
    def noise_shape(cls, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of the random tensor it reads for a weight of ``weight_shape``."""
        return tuple(weight_shape)

    @classmethod
    def function_proto(cls) -> onnx.FunctionProto:
        inputs, nodes = cls.body()
        return helper.make_function(
            RRCOMPILE_DOMAIN, cls.op_type, inputs, ["Y"], nodes,
            [helper.make_opsetid("", TARGET_OPSET)], attributes=list(cls.params),
            doc_string=(cls.__doc__ or "").strip().splitlines()[0],
        )


class LogNormalVariation(DeviceModel):
    """Log-normal multiplicative variation ``W * exp(theta)``, ``theta ~ N(0, sigma^2)``, per chip.

    Source: CorrectNet (Eldebiky et al., DATE 2023, arXiv 2211.14917), eq. (1): RRAM process
    variation makes each programmed conductance deviate log-normally from its target.
    """

    kind, op_type, order = "lognormal", "LogNormalVariation", 1
    noise = Noise("normal", "chip")
    params = ("sigma",)

    MAPPINGS = ("single", "differential")

    def validate(self) -> None:
        self._check_range("sigma", 0.0)

    @classmethod
    def accepted(cls) -> tuple[str, ...]:
        return ("sigma", "mapping", "g0")

    @classmethod
    def from_spec(cls, raw: dict[str, str], term: str) -> DeviceTerm:
        raw = dict(raw)
        mapping = raw.pop("mapping", "single").strip()
        if mapping not in cls.MAPPINGS:
            raise DeviceSpecError(f"device 'lognormal': unknown mapping '{mapping}' (expected {' or '.join(cls.MAPPINGS)})")
        if mapping == "single" and "g0" in raw:
            raise DeviceSpecError("device 'lognormal': g0 is the reference conductance of mapping=differential only")
        target = DifferentialLogNormalVariation if mapping == "differential" else LogNormalVariation
        return DeviceTerm.from_spec.__func__(target, raw, term)

    @classmethod
    def body(cls):
        return ["W", "Z"], [
            _param("sigma", "sigma"),
            helper.make_node("Mul", ["Z", "sigma"], ["theta"]),
            helper.make_node("Exp", ["theta"], ["factor"]),
            helper.make_node("Mul", ["W", "factor"], ["Y"]),
        ]

    def apply(self, w, w_range, noise):
        return w * np.exp(np.float32(self.values["sigma"]) * noise)

    def apply_torch(self, w, w_range, noise):
        import torch

        return w * torch.exp(noise * self.values["sigma"])


class DifferentialLogNormalVariation(LogNormalVariation):
    """Log-normal variation of a differential conductance pair, each conductance varied on its own, per chip.

    A signed weight is stored as two cells, ``W = G+ - G-`` with ``G+ = max(W, 0) + g0 * R`` and
    ``G- = max(-W, 0) + g0 * R`` (``R = max|W|``; ``g0``, default 0.1, is the reference conductance of
    the idle cell relative to the range: an on/off ratio of about 11, a usual RRAM window, Yu, Proc.
    IEEE 2018). Each cell deviates as in CorrectNet's eq. (1):
    ``Y = G+ * exp(sigma * Z+) - G- * exp(sigma * Z-)``, ``Z+, Z-`` independent standard normals (the
    noise input ``Z`` is ``[2, *W.shape]``). Unlike the single-cell model, a weight near zero keeps
    an absolute error of about ``g0 * R * sigma * sqrt(2)`` (the pair's mapping as in aihwkit's
    ``PCMLikeNoiseModel``, Joshi et al., Nature Communications 11, 2473, 2020).
    """

    op_type = "DifferentialLogNormalVariation"
    params = ("sigma", "g0")
    defaults = {"g0": 0.1}

    def validate(self) -> None:
        self._check_range("sigma", 0.0)
        self._check_range("g0", 0.0)

    @property
    def is_identity(self) -> bool:
        return self.values["sigma"] == 0

    def spec(self) -> str:
        return f"lognormal:sigma={self.values['sigma']:g},mapping=differential,g0={self.values['g0']:g}"

    @classmethod
    def noise_shape(cls, weight_shape: tuple[int, ...]) -> tuple[int, ...]:
        return (2, *weight_shape)

    @classmethod
    def body(cls):
        return ["W", "R", "Z"], [
            _param("sigma", "sigma"), _param("g0", "g0"), _const(0.0, "zero"),
            helper.make_node("Constant", [], ["first"], value_ints=[0]),
            helper.make_node("Constant", [], ["second"], value_ints=[1]),
            helper.make_node("Mul", ["R", "g0"], ["reference"]),
            helper.make_node("Max", ["W", "zero"], ["positive"]),
            helper.make_node("Neg", ["W"], ["minus_w"]),
            helper.make_node("Max", ["minus_w", "zero"], ["negative"]),
            helper.make_node("Add", ["positive", "reference"], ["g_plus"]),
            helper.make_node("Add", ["negative", "reference"], ["g_minus"]),
            helper.make_node("Gather", ["Z", "first"], ["z_plus_1"], axis=0),
            helper.make_node("Gather", ["Z", "second"], ["z_minus_1"], axis=0),
            helper.make_node("Squeeze", ["z_plus_1", "first"], ["z_plus"]),
            helper.make_node("Squeeze", ["z_minus_1", "first"], ["z_minus"]),
            helper.make_node("Mul", ["z_plus", "sigma"], ["theta_plus"]),
            helper.make_node("Mul", ["z_minus", "sigma"], ["theta_minus"]),
            helper.make_node("Exp", ["theta_plus"], ["factor_plus"]),
            helper.make_node("Exp", ["theta_minus"], ["factor_minus"]),
            helper.make_node("Mul", ["g_plus", "factor_plus"], ["varied_plus"]),
            helper.make_node("Mul", ["g_minus", "factor_minus"], ["varied_minus"]),
            helper.make_node("Sub", ["varied_plus", "varied_minus"], ["Y"]),
        ]

    def apply(self, w, w_range, noise):
        sigma, reference = np.float32(self.values["sigma"]), np.float32(w_range) * np.float32(self.values["g0"])
        g_plus = np.maximum(w, np.float32(0)) + reference
        g_minus = np.maximum(-w, np.float32(0)) + reference
        return g_plus * np.exp(noise[0] * sigma) - g_minus * np.exp(noise[1] * sigma)

    def apply_torch(self, w, w_range, noise):
        import torch

        reference = w_range * torch.tensor(self.values["g0"], dtype=torch.float32)
        g_plus = torch.clamp_min(w, 0.0) + reference
        g_minus = torch.clamp_min(-w, 0.0) + reference
        sigma = self.values["sigma"]
        return g_plus * torch.exp(noise[0] * sigma) - g_minus * torch.exp(noise[1] * sigma)


class _AdditiveNoise(DeviceModel):
    params = ("eta",)

    def validate(self) -> None:
        self._check_range("eta", 0.0)

    @classmethod
    def body(cls):
        return ["W", "R", "Z"], [
            _param("eta", "eta"),
            helper.make_node("Mul", ["R", "eta"], ["std"]),
            helper.make_node("Mul", ["Z", "std"], ["delta"]),
            helper.make_node("Add", ["W", "delta"], ["Y"]),
        ]

    def apply(self, w, w_range, noise):
        return w + noise * (np.float32(w_range) * np.float32(self.values["eta"]))

    def apply_torch(self, w, w_range, noise):
        return w + noise * (w_range * self.values["eta"])


class ProgrammingNoise(_AdditiveNoise):
    """Additive programming noise ``W + N(0, (eta * max|W|)^2)``, drawn once per chip.

    Source: aihwkit's inference noise models (IBM, Rasch et al. 2021), which express programming
    noise relative to the layer's maximum weight (``g_max``).
    """

    kind, op_type, order = "programming", "ProgrammingNoise", 2
    noise = Noise("normal", "chip")


class ReadNoise(_AdditiveNoise):
    """Read noise ``W + N(0, (eta * max|W|)^2)``, drawn anew for every inference (session run).

    Source: aihwkit's inference noise models (read noise on every forward pass, relative to the
    layer's weight range); per-run rather than per-image, as one crossbar read serves a batch.
    """

    kind, op_type, order = "read", "ReadNoise", 4
    noise = Noise("normal", "inference")


class Quantize(DeviceModel):
    """Conductance quantization to ``levels`` equally spaced values over ``[-max|W|, max|W|]``.

    ``delta = 2R / (levels - 1)``, ``W_q = -R + delta * clip(round((W + R) / delta), 0, levels - 1)``:
    a device programmed to one of ``levels`` states (Yu, "Neuro-inspired computing with emerging
    nonvolatile memory", Proc. IEEE 2018). Deterministic: the same on every chip.
    """

    kind, op_type, order = "quantize", "Quantize", 0
    noise = None
    params = ("levels",)

    def validate(self) -> None:
        levels = self.values["levels"]
        if not math.isfinite(levels) or levels != int(levels) or levels < 2:
            raise DeviceSpecError(f"device 'quantize': levels={levels:g} must be an integer >= 2")
        self.values["levels"] = int(levels)

    @property
    def is_identity(self) -> bool:
        return False

    @classmethod
    def body(cls):
        return ["W", "R"], [
            _param("levels", "levels_i", integer=True),
            helper.make_node("Cast", ["levels_i"], ["levels"], to=onnx.TensorProto.FLOAT),
            _const(1.0, "one"), _const(2.0, "two"), _const(0.0, "zero"), _const(1e-30, "tiny"),
            helper.make_node("Sub", ["levels", "one"], ["steps"]),
            helper.make_node("Mul", ["R", "two"], ["span"]),
            helper.make_node("Div", ["span", "steps"], ["raw_delta"]),
            helper.make_node("Max", ["raw_delta", "tiny"], ["delta"]),  # an all-zero layer stays zero
            helper.make_node("Add", ["W", "R"], ["shifted"]),
            helper.make_node("Div", ["shifted", "delta"], ["position"]),
            helper.make_node("Round", ["position"], ["rounded"]),
            helper.make_node("Clip", ["rounded", "zero", "steps"], ["level"]),
            helper.make_node("Mul", ["level", "delta"], ["offset"]),
            helper.make_node("Sub", ["offset", "R"], ["Y"]),
        ]

    def apply(self, w, w_range, noise):
        levels = self.values["levels"]
        r = np.float32(w_range)
        delta = np.maximum(r * np.float32(2) / np.float32(levels - 1), np.float32(1e-30))
        level = np.clip(np.round((w + r) / delta), 0, levels - 1)
        return level * delta - r

    def apply_torch(self, w, w_range, noise):
        import torch

        levels = self.values["levels"]
        delta = torch.clamp_min(w_range * 2.0 / (levels - 1), 1e-30)
        level = torch.clamp(torch.round((w + w_range) / delta), 0, levels - 1)
        return level * delta - w_range


class StuckAtFault(DeviceModel):
    """Stuck-at faults: a fraction ``p_off`` of cells stuck at zero conductance (weight 0) and
    ``p_on`` stuck at the maximum (weight ``sign(W) * max|W|``), drawn once per chip.

    Source: stuck-at-fault models of RRAM crossbars (Chen et al., "RRAM defect modeling and failure
    analysis based on march test", DATE 2015; Xia et al., DAC 2017).
    """

    kind, op_type, order = "stuck", "StuckAtFault", 3
    noise = Noise("uniform", "chip")
    params = ("p_off", "p_on")

    def validate(self) -> None:
        self._check_range("p_off", 0.0, 1.0)
        self._check_range("p_on", 0.0, 1.0)
        if self.values["p_off"] + self.values["p_on"] > 1:
            raise DeviceSpecError("device 'stuck': p_off + p_on must be <= 1")

    @classmethod
    def body(cls):
        return ["W", "R", "U"], [
            _param("p_off", "p_off"), _param("p_on", "p_on"), _const(0.0, "zero"), _const(1.0, "one"),
            helper.make_node("Less", ["U", "p_off"], ["is_off"]),
            helper.make_node("Sub", ["one", "p_on"], ["on_threshold"]),
            helper.make_node("GreaterOrEqual", ["U", "on_threshold"], ["is_on"]),
            helper.make_node("Neg", ["R"], ["minus_r"]),
            helper.make_node("Less", ["W", "zero"], ["negative"]),
            helper.make_node("Where", ["negative", "minus_r", "R"], ["on_value"]),
            helper.make_node("Where", ["is_on", "on_value", "W"], ["maybe_on"]),
            helper.make_node("Where", ["is_off", "zero", "maybe_on"], ["Y"]),
        ]

    def apply(self, w, w_range, noise):
        r = np.float32(w_range)
        on_value = np.where(w < 0, -r, r)
        y = np.where(noise >= np.float32(1) - np.float32(self.values["p_on"]), on_value, w)
        return np.where(noise < np.float32(self.values["p_off"]), np.float32(0), y).astype(w.dtype)

    def apply_torch(self, w, w_range, noise):
        import torch

        on_value = torch.where(w < 0, -w_range, w_range)
        one, p_on = (torch.tensor(v, dtype=torch.float32) for v in (1.0, self.values["p_on"]))
        y = torch.where(noise >= one - p_on, on_value, w)  # the threshold in float32, as in ONNX
        return torch.where(noise < self.values["p_off"], torch.zeros_like(w), y)


class CrossbarModel(DeviceTerm):
    """The crossbar a layer runs on (tiles, ADCs): changes the layer's computation, not its weight.

    Applied after every weight effect; :mod:`rrcompile.crossbar` rewrites the layer (its ONNX
    functions, numpy references and torch versions live there).
    """

    @property
    def random(self) -> bool:
        """Whether it draws anything (two chips, or two runs, then differ)."""
        return False


class Tile(CrossbarModel):
    """Crossbar tiles: the layer's ``rows x cols`` matrix split over arrays of ``size`` rows and ``cols`` columns.

    Rows are the layer's fan-in (``Cin/group x kh x kw`` for a convolution, in the weight's own
    order, as ``rrcompile inspect`` counts them); tile ``t`` holds rows ``t*size .. (t+1)*size - 1``.
    Each array computes its partial sums ``P_t = sum_{r in t} x_r W_r`` in the analog domain; the
    partial sums are added in digital logic, ``Y = sum_t ADC(P_t) + b`` (the bias digital too, as
    aihwkit's ``digital_bias``). Without an ``adc`` term the ADC is ideal and the result equals the
    untiled layer. Columns matter only to the ADC ranges (one range per array). The organisation is
    ISAAC's (Shafiee et al., ISCA 2016: 128 x 128 arrays, partial sums shifted and added digitally).
    Default ``size=128``, ``cols=size``.
    """

    kind, order = "tile", 10
    params = ("size", "cols")
    defaults = {"size": 128.0}
    optional = ("cols",)

    def validate(self) -> None:
        self._check_integer("size", 1, 1 << 20)
        self.values.setdefault("cols", self.values["size"])
        self._check_integer("cols", 1, 1 << 20)

    @property
    def is_identity(self) -> bool:
        return True  # tiling alone changes no number (up to float summation order)


class Adc(CrossbarModel):
    """ADCs after every tile: each array's column outputs clipped to ``[-A, A]`` and quantized to
    ``2^bits - 1`` levels before the digital accumulation.

    ``Y_t = clip(round((P_t + noise * A * Z) / delta), -L, L) * delta``, ``L = 2^(bits-1) - 1``,
    ``delta = A / L``: a symmetric mid-tread converter with zero as a level, the form of aihwkit's
    output discretization (``out_res = 1 / (2^bits - 2)`` over ``[-out_bound, out_bound]``, Rasch et
    al., 2021). The full scale ``A`` is fixed per tile (and column block) at compile time: the
    ``range``-th percentile (default 100, the largest) of ``|P_t|`` of the clean network on training
    images, stored in the graph as ``<layer>.adc_range``. ``noise`` (default 0) adds Gaussian ADC
    noise of standard deviation ``noise * A`` to every conversion, drawn anew for every inference
    (one draw per output position and column, shared by the images of one run, as read noise is).
    """

    kind, order = "adc", 11
    params = ("bits", "range", "noise")
    defaults = {"range": 100.0, "noise": 0.0}

    def validate(self) -> None:
        self._check_integer("bits", 2, 24)
        range_ = self.values["range"]
        if not math.isfinite(range_) or not 0 < range_ <= 100:
            raise DeviceSpecError(f"device 'adc': range={range_:g} must be a percentile in (0, 100]")
        self._check_range("noise", 0.0)

    @property
    def levels(self) -> int:
        """Non-negative levels of the converter, ``L = 2^(bits-1) - 1``."""
        return (1 << (self.values["bits"] - 1)) - 1

    @property
    def is_identity(self) -> bool:
        return False

    @property
    def random(self) -> bool:
        return self.values["noise"] > 0

    def spec(self) -> str:
        return (f"adc:bits={self.values['bits']}" + (f",range={self.values['range']:g}" if self.values["range"] != 100 else "")
                + (f",noise={self.values['noise']:g}" if self.values["noise"] else ""))


DEVICE_MODELS: dict[str, type[DeviceModel]] = {
    cls.kind: cls for cls in (LogNormalVariation, ProgrammingNoise, ReadNoise, Quantize, StuckAtFault)
}
CROSSBAR_MODELS: dict[str, type[CrossbarModel]] = {cls.kind: cls for cls in (Tile, Adc)}
KINDS: dict[str, type[DeviceTerm]] = {**DEVICE_MODELS, **CROSSBAR_MODELS}
# every weight-effect function, variants of a kind included (lognormal's differential mapping)
BY_OP_TYPE: dict[str, type[DeviceModel]] = {
    cls.op_type: cls for cls in (*DEVICE_MODELS.values(), DifferentialLogNormalVariation)
}
ALIASES = {"additive": "programming", "stuck-at": "stuck", "quant": "quantize"}
ADC_NOISE = Noise("normal", "inference")
ADC_NOISE_OP = "AdcNoise"  # the ADC function that reads a noise input (rrcompile.crossbar)


def weight_models(stack: list[DeviceTerm]) -> list[DeviceModel]:
    """The weight effects of a layer's stack, in physical order."""
    return [m for m in stack if isinstance(m, DeviceModel)]


def crossbar_models(stack: list[DeviceTerm]) -> tuple[Tile | None, Adc | None]:
    """The layer's tile and ADC terms (None where the stack has none)."""
    tile = next((m for m in stack if isinstance(m, Tile)), None)
    adc = next((m for m in stack if isinstance(m, Adc)), None)
    return tile, adc


def is_variation(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a variation op: an ``ai.rrcompile`` call of a device model."""
    return node.domain == RRCOMPILE_DOMAIN and node.op_type in BY_OP_TYPE


def parse_models(spec: str) -> list[DeviceTerm]:
    """Parse ``kind:key=value,...`` terms joined by ``+``, e.g. ``lognormal:sigma=0.5+read:eta=0.01``
    or ``tile:size=128+adc:bits=8+lognormal:sigma=0.5``.

    ``none`` (or an empty string) means no variation. The result is in physical order (weight
    effects first, then the crossbar terms).
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    models: dict[str, DeviceTerm] = {}
    for term in spec.split("+"):
        kind, _, arg_text = term.strip().partition(":")
        kind = ALIASES.get(kind.strip(), kind.strip())
        if kind not in KINDS:
            raise DeviceSpecError(f"unknown device model '{kind}' in '{spec}' (known: {', '.join(KINDS)})")
        cls = KINDS[kind]
        raw: dict[str, str] = {}
        for pair in filter(None, (p.strip() for p in arg_text.split(","))):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or key not in cls.accepted():
                raise DeviceSpecError(f"device '{kind}': bad parameter '{pair}' (expected {', '.join(p + '=...' for p in cls.accepted())})")
            raw[key] = value.strip()
        if kind in models:
            raise DeviceSpecError(f"device '{kind}' given twice in '{spec}'")
        models[kind] = cls.from_spec(raw, term.strip())
    return sorted(models.values(), key=lambda m: m.order)


def _models_from_value(value: Any, where: str) -> list[DeviceTerm]:
    """A device-file entry: a spec string, a list of spec strings, or ``{kind: {param: value}}``."""
    if value is None:
        return []
    if isinstance(value, str):
        return parse_models(value)
    if isinstance(value, list):
        return parse_models("+".join(str(v) for v in value)) if value else []
    if isinstance(value, Mapping):
        terms = []
        for kind, params in value.items():
            if not isinstance(params, Mapping):
                raise DeviceSpecError(f"{where}: parameters of '{kind}' must be a mapping")
            terms.append(f"{kind}:" + ",".join(f"{k}={v}" for k, v in params.items()))
        return parse_models("+".join(terms))
    raise DeviceSpecError(f"{where}: expected a spec string, a list or a mapping, got {type(value).__name__}")


@dataclasses.dataclass
class DeviceConfig:
    """The device models of every analog layer: a default stack and per-layer overrides.

    Overrides are matched in order against the layer's node name, then its weight name, with
    shell-style wildcards (``Gemm_*``); an empty stack keeps a layer exact (e.g. digital).

    ``adc_ranges`` holds the ADC full scales once fixed for a model (by node name, ``[M, T]``;
    :func:`rrcompile.crossbar.with_adc_ranges`): a converter's range is part of the hardware a
    compiled model runs on, so the config carries it to every evaluator, trainer and chip that
    simulates the device, and a sigma sweep keeps it.
    """

    default: list[DeviceTerm]
    layers: dict[str, list[DeviceTerm]] = dataclasses.field(default_factory=dict)
    source: str | None = dataclasses.field(default=None, compare=False)  # the device file, for messages
    adc_ranges: dict[str, np.ndarray] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def for_layer(self, node: str, weight: str) -> list[DeviceTerm]:
        for pattern, models in self.layers.items():
            if fnmatch.fnmatchcase(node, pattern) or fnmatch.fnmatchcase(weight, pattern):
                return models
        return self.default

    def check_patterns(self, layers: list[AnalogLayer]) -> None:
        """Refuse a layer pattern that matches none of ``layers``: its override would silently
        never apply (a typo, a broken glob, names of another export of the model)."""
        for pattern in self.layers:
            if not any(fnmatch.fnmatchcase(name, pattern) for layer in layers for name in (layer.node, layer.weight)):
                names = ", ".join(layer.node for layer in layers) or "none"
                where = f"{self.source}: " if self.source else ""
                raise DeviceSpecError(f"{where}layer pattern '{pattern}' matches no analog layer of the model "
                                      f"(analog layers: {names})")

    def stacks(self) -> list[list[DeviceTerm]]:
        return [self.default, *self.layers.values()]

    @property
    def is_identity(self) -> bool:
        return all(m.is_identity for stack in self.stacks() for m in stack)

    @property
    def same_chips(self) -> bool:
        """Every chip is the same chip: each weight effect is off and no crossbar term draws noise."""
        return all(m.is_identity if isinstance(m, DeviceModel) else not m.random
                   for stack in self.stacks() for m in stack)

    @property
    def crossbar(self) -> bool:
        """Whether some layer has a tile or ADC term."""
        return any(isinstance(m, CrossbarModel) for stack in self.stacks() for m in stack)

    def hardware(self) -> "DeviceConfig":
        """The crossbar terms alone, without ADC noise: what a deployed graph computes (the ideal
        chip's tiles and converters, no weight effect, nothing drawn); the ADC ranges kept."""
        def keep(stack: list[DeviceTerm]) -> list[DeviceTerm]:
            return [m.with_values(noise=0.0) if isinstance(m, Adc) else m for m in stack if isinstance(m, CrossbarModel)]

        return DeviceConfig(keep(self.default), {k: keep(v) for k, v in self.layers.items()}, self.source,
                            self.adc_ranges)

    def lognormal_sigmas(self) -> set[float]:
        """The sigmas of the config's log-normal terms: what a sigma sweep varies."""
        return {m.values["sigma"] for stack in self.stacks() for m in stack if isinstance(m, LogNormalVariation)}

    def with_sigma(self, sigma: float) -> "DeviceConfig":
        """The same config with every log-normal sigma set to ``sigma`` (for sigma sweeps)."""
        if not self.lognormal_sigmas():
            raise DeviceSpecError("a sigma sweep needs a 'lognormal' device model in --device")

        def swap(stack: list[DeviceTerm]) -> list[DeviceTerm]:
            return [m.with_values(sigma=sigma) if isinstance(m, LogNormalVariation) else m for m in stack]

        return DeviceConfig(swap(self.default), {k: swap(v) for k, v in self.layers.items()}, self.source,
                            self.adc_ranges)

    def to_dict(self) -> dict:
        """The config as a device file's content (``default`` and ``layers`` spec strings)."""
        return {"default": "+".join(m.spec() for m in self.default) or "none",
                "layers": {k: "+".join(m.spec() for m in v) or "none" for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, content: Any, where: str, source: str | None = None) -> "DeviceConfig":
        """A config from a device file's content (see :func:`parse_device`); ``where`` names it in errors."""
        if not isinstance(content, Mapping) or not set(content) <= {"default", "layers"}:
            raise DeviceSpecError(f"{where}: a device file is a mapping with keys 'default' and 'layers'")
        layers = content.get("layers") or {}
        if not isinstance(layers, Mapping):
            raise DeviceSpecError(f"{where}: 'layers' must map layer names to device entries")
        return cls(_models_from_value(content.get("default"), f"{where}: default"),
                   {str(k): _models_from_value(v, f"{where}: layers.{k}") for k, v in layers.items()}, source=source)

    def describe(self) -> str:
        parts = ["+".join(m.spec() for m in self.default) or "none"] if self.default or not self.layers else []
        parts += [f"{k}: {'+'.join(m.spec() for m in v) or 'none'}" for k, v in self.layers.items()]
        return "; ".join(parts)


def device_file(spec: str) -> Path | None:
    """The device file a spec names, or None for an inline spec."""
    path = Path(spec)
    return path if path.suffix.lower() in (".json", ".yaml", ".yml") else None


def parse_device(spec: str) -> DeviceConfig:
    """A device config from a spec string or from a ``.json`` / ``.yaml`` / ``.yml`` device file.

    A file holds ``{"default": <entry>, "layers": {<pattern>: <entry>, ...}}``.
    """
    path = device_file(spec)
    if path is not None:
        if not path.is_file():
            raise DeviceSpecError(f"{spec}: device file not found")
        try:
            text = path.read_text()
            if path.suffix.lower() == ".json":
                content = json.loads(text)
            else:
                import yaml

                content = yaml.safe_load(text)
        except Exception as exc:
            raise DeviceSpecError(f"{spec}: unreadable device file ({str(exc).splitlines()[0]})") from None
        try:
            return DeviceConfig.from_dict(content, spec, source=spec)
        except DeviceSpecError as exc:
            raise exc if str(exc).startswith(f"{spec}: ") else DeviceSpecError(f"{spec}: {exc}") from None
    return DeviceConfig(parse_models(spec))


@dataclasses.dataclass(frozen=True)
class NoiseInput:
    name: str
    shape: tuple[int, ...]
    noise: Noise


def noise_inputs(model: onnx.ModelProto) -> list[NoiseInput]:
    """The graph inputs of a varied model that carry random draws, with what to draw for each."""
    readers: dict[str, Noise] = {}
    for node in model.graph.node:
        if is_variation(node):
            cls = BY_OP_TYPE[node.op_type]
            if cls.noise is not None:
                readers[node.input[-1]] = cls.noise
        elif node.domain == RRCOMPILE_DOMAIN and node.op_type == ADC_NOISE_OP:
            readers[node.input[-1]] = ADC_NOISE
    found = []
    for vi in model.graph.input:
        if vi.name in readers:
            shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            found.append(NoiseInput(vi.name, shape, readers[vi.name]))
    return found


def simulated_device(model: onnx.ModelProto) -> DeviceConfig | None:
    """The device a simulation graph carries: each analog layer's chain of variation ops, and its
    tile and ADC (the attributes of its ``<layer>.tile_weight`` and ``<layer>.adc`` nodes, and the
    ADC ranges it stores), read back into device terms (per layer, by node name); None for a graph
    without variation or crossbar ops."""
    producer = producers(model)
    by_name = {node.name: node for node in model.graph.node if node.domain == RRCOMPILE_DOMAIN}
    layers: dict[str, list[DeviceTerm]] = {}
    for node in model.graph.node:
        if not is_analog_op(node):
            continue
        stack: list[DeviceTerm] = [BY_OP_TYPE[op.op_type](**_attributes(op))
                                   for op in variation_chain(node.input[1], producer) if is_variation(op)]
        tile, adc = by_name.get(f"{node.name}.tile_weight"), by_name.get(f"{node.name}.adc")
        if tile is not None:
            values = _attributes(tile)
            stack.append(Tile(size=values["size"], cols=values["cols"]))
        if adc is not None:
            stack.append(Adc(**{k: v for k, v in _attributes(adc).items() if k in Adc.params}))
        if stack:
            layers[node.name] = sorted(stack, key=lambda m: m.order)
    return DeviceConfig([], layers, adc_ranges=stored_adc_ranges(model)) if layers else None


ADC_RANGE_SUFFIX = ".adc_range"  # <layer>.adc_range: the ADC full scales a tiled graph stores


def stored_adc_ranges(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The ADC ranges a tiled graph carries (``<layer>.adc_range``, by node name, as ``[M, T]``)."""
    ranges = {}
    for tensor in model.graph.initializer:
        if tensor.name.endswith(ADC_RANGE_SUFFIX):
            value = numpy_helper.to_array(tensor)
            ranges[tensor.name[: -len(ADC_RANGE_SUFFIX)]] = value.reshape(value.shape[0], value.shape[1])
    return ranges


def _attributes(node: onnx.NodeProto) -> dict[str, float]:
    return {a.name: _from_attribute(a) for a in node.attribute}


def _from_attribute(attribute: onnx.AttributeProto) -> float:
    """An attribute's value as written in the spec: float32 attributes hold 0.01 as 0.0099999998,
    and the shortest float32 repr gives the 0.01 back."""
    value = helper.get_attribute_value(attribute)
    return float(str(np.float32(value))) if isinstance(value, float) else value
