"""RRAM device models and the ``ai.rrcompile`` ONNX functions that simulate them.

Each model acts on one analog layer's weight matrix ``W`` with range ``R = max|W|`` (the layer's
conductance range, taken from the programmed weight). A layer's models always apply in physical
order, whatever order they were written in: quantize (the programming target) -> log-normal
variation -> programming noise -> stuck-at faults -> read noise.

Randomness never lives inside the graph: every stochastic model reads a standard-normal or
uniform tensor shaped like ``W`` as an extra graph input, which the Monte Carlo evaluator draws
from its seeded generator. One draw of the per-chip tensors is one simulated chip; read noise is
drawn again for every inference (every ``session.run``).

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
from onnx import helper

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


class DeviceModel(abc.ABC):
    """One physical effect on the programmed conductances of a layer."""

    kind: ClassVar[str]  # name in device specs
    op_type: ClassVar[str]  # function name in the ai.rrcompile domain
    order: ClassVar[int]  # physical order of application within a layer
    noise: ClassVar[Noise | None]  # the random tensor it reads, if any
    params: ClassVar[tuple[str, ...]]

    def __init__(self, **values: float):
        self.values = values
        self.validate()

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

    @property
    def is_identity(self) -> bool:
        """True when the parameters switch the effect off (sigma = 0 and the like)."""
        return all(self.values[p] == 0 for p in self.params)

    @classmethod
    def function_proto(cls) -> onnx.FunctionProto:
        inputs, nodes = cls.body()
        return helper.make_function(
            RRCOMPILE_DOMAIN, cls.op_type, inputs, ["Y"], nodes,
            [helper.make_opsetid("", TARGET_OPSET)], attributes=list(cls.params),
            doc_string=(cls.__doc__ or "").strip().splitlines()[0],
        )

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


class LogNormalVariation(DeviceModel):
    """Log-normal multiplicative variation ``W * exp(theta)``, ``theta ~ N(0, sigma^2)``, per chip.

    Source: CorrectNet (Eldebiky et al., DATE 2023, arXiv 2211.14917), eq. (1): RRAM process
    variation makes each programmed conductance deviate log-normally from its target.
    """

    kind, op_type, order = "lognormal", "LogNormalVariation", 1
    noise = Noise("normal", "chip")
    params = ("sigma",)

    def validate(self) -> None:
        self._check_range("sigma", 0.0)

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


DEVICE_MODELS: dict[str, type[DeviceModel]] = {
    cls.kind: cls for cls in (LogNormalVariation, ProgrammingNoise, ReadNoise, Quantize, StuckAtFault)
}
BY_OP_TYPE: dict[str, type[DeviceModel]] = {cls.op_type: cls for cls in DEVICE_MODELS.values()}
ALIASES = {"additive": "programming", "stuck-at": "stuck", "quant": "quantize"}


def is_variation(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a variation op: an ``ai.rrcompile`` call of a device model."""
    return node.domain == RRCOMPILE_DOMAIN and node.op_type in BY_OP_TYPE


def parse_models(spec: str) -> list[DeviceModel]:
    """Parse ``kind:key=value,...`` terms joined by ``+``, e.g. ``lognormal:sigma=0.5+read:eta=0.01``.

    ``none`` (or an empty string) means no variation. The result is in physical order.
    """
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    models: dict[str, DeviceModel] = {}
    for term in spec.split("+"):
        kind, _, arg_text = term.strip().partition(":")
        kind = ALIASES.get(kind.strip(), kind.strip())
        if kind not in DEVICE_MODELS:
            raise DeviceSpecError(f"unknown device model '{kind}' in '{spec}' (known: {', '.join(DEVICE_MODELS)})")
        cls = DEVICE_MODELS[kind]
        values: dict[str, float] = {}
        for pair in filter(None, (p.strip() for p in arg_text.split(","))):
            key, eq, value = pair.partition("=")
            key = key.strip()
            if not eq or key not in cls.params:
                raise DeviceSpecError(f"device '{kind}': bad parameter '{pair}' (expected {', '.join(p + '=...' for p in cls.params)})")
            try:
                values[key] = float(value)
            except ValueError:
                raise DeviceSpecError(f"device '{kind}': {key}={value!r} is not a number") from None
        missing = [p for p in cls.params if p not in values]
        if missing:
            raise DeviceSpecError(f"device '{kind}': missing {', '.join(missing)} in '{term.strip()}'")
        if kind in models:
            raise DeviceSpecError(f"device '{kind}' given twice in '{spec}'")
        models[kind] = cls(**values)
    return sorted(models.values(), key=lambda m: m.order)


def _models_from_value(value: Any, where: str) -> list[DeviceModel]:
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
    """

    default: list[DeviceModel]
    layers: dict[str, list[DeviceModel]] = dataclasses.field(default_factory=dict)
    source: str | None = dataclasses.field(default=None, compare=False)  # the device file, for messages

    def for_layer(self, node: str, weight: str) -> list[DeviceModel]:
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

    def stacks(self) -> list[list[DeviceModel]]:
        return [self.default, *self.layers.values()]

    @property
    def is_identity(self) -> bool:
        return all(m.is_identity for stack in self.stacks() for m in stack)

    def with_sigma(self, sigma: float) -> "DeviceConfig":
        """The same config with every log-normal sigma set to ``sigma`` (for sigma sweeps)."""
        if not any(isinstance(m, LogNormalVariation) for stack in self.stacks() for m in stack):
            raise DeviceSpecError("a sigma sweep needs a 'lognormal' device model in --device")

        def swap(stack: list[DeviceModel]) -> list[DeviceModel]:
            return [LogNormalVariation(sigma=sigma) if isinstance(m, LogNormalVariation) else m for m in stack]

        return DeviceConfig(swap(self.default), {k: swap(v) for k, v in self.layers.items()}, self.source)

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
    readers: dict[str, type[DeviceModel]] = {}
    for node in model.graph.node:
        if is_variation(node):
            cls = BY_OP_TYPE[node.op_type]
            if cls.noise is not None:
                readers[node.input[-1]] = cls
    found = []
    for vi in model.graph.input:
        if vi.name in readers:
            shape = tuple(d.dim_value for d in vi.type.tensor_type.shape.dim)
            found.append(NoiseInput(vi.name, shape, readers[vi.name].noise))
    return found


def simulated_device(model: onnx.ModelProto) -> DeviceConfig | None:
    """The device a simulation graph carries: each analog layer's chain of variation ops, read back
    into device models (per layer, by node name); None for a graph without variation ops."""
    producer = producers(model)
    layers: dict[str, list[DeviceModel]] = {}
    for node in model.graph.node:
        if not is_analog_op(node):
            continue
        stack = [BY_OP_TYPE[op.op_type](**{a.name: _from_attribute(a) for a in op.attribute})
                 for op in variation_chain(node.input[1], producer) if is_variation(op)]
        if stack:
            layers[node.name] = sorted(stack, key=lambda m: m.order)
    return DeviceConfig([], layers) if layers else None


def _from_attribute(attribute: onnx.AttributeProto) -> float:
    """An attribute's value as written in the spec: float32 attributes hold 0.01 as 0.0099999998,
    and the shortest float32 repr gives the 0.01 back."""
    value = helper.get_attribute_value(attribute)
    return float(str(np.float32(value))) if isinstance(value, float) else value
