"""Error compensation: digital low-rank corrections added to an analog layer's output.

CorrectNet's second stage places compensation at the layers a reinforcement-learning agent picks,
to rescue the feature maps that still carry errors once Lipschitz regularization has suppressed
their growth. The compensation runs on reliable digital logic, so its weights never vary.

The sources at hand for arXiv 2211.14917 (its abstract and summaries) say where compensation goes
and that its cost is small, not how a compensation unit is built. rrcompile uses a low-rank
correction that reads the layer's own input: for a layer computing ``Y`` from ``X``,

    ConvCompensation:  Y + G * Conv(Conv(X, Wd), Wu)    Wd [r, Cin, kh, kw] (the layer's kernel,
                                                         strides, pads, dilations; group 1),
                                                         Wu [Cout, r, 1, 1]
    DenseCompensation: Y + G * MatMul(MatMul(X, Wd), Wu) Wd [in, r], Wu [r, out]

``G`` is a float32 scalar gate: 1 when the candidate is on, 0 to switch it off. A rank-``r`` unit
costs ``r * (rows + cols)`` digital weights, a crossbar's rows and columns for the layer, so the
rank sets the trade-off between correction power and overhead.

Two modes share these forms. *Trained* compensation (the paper's, ``ConvCompensation`` and
``DenseCompensation``) learns ``Wd`` and ``Wu`` once, for every chip; it can only learn the error
that all chips share. *Calibrated* compensation (``ConvCalibration``, ``DenseCalibration``) adds a
per-column gain ``A`` and offset ``B``,

    Z = A * Y + B + G * up(down(X))

and splits the parameters by when they are known: the slot's place and rank (where the digital
budget goes) are fixed at compile time; ``Wd``, ``Wu``, ``A`` and ``B`` are solved for each
programmed chip in closed form from a few unlabeled images (``rrcompile.calibrate``). Why, measured
(``bench/calibration_forms.py``, figures in ``rrcompile/calibrate.py``): a chip's error
``(W' - W) x`` is a random matrix applied to ``x``; no fixed weight predicts it, but its strongest
``r`` directions on the layer's inputs are a small matrix that a reduced-rank least-squares fit on
measured outputs recovers (fixing ``Wd`` at compile time, as the error-weighted principal
directions of the inputs, is the other measured option, ``projection="compiled"``: 0.2 to 0.8
points worse on LeNet-5), and the gain and offset take the column-wise part of the rest for
``2 * cols`` weights.
"""
from __future__ import annotations

import abc
import dataclasses
import math
from typing import ClassVar

import numpy as np
import onnx
from onnx import helper

from rrcompile.crossbar import tiled_outputs
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET, AnalogLayer, tensor_shapes

_INPUTS = ["Y", "X", "Wd", "Wu", "G"]
_CALIBRATION_INPUTS = [*_INPUTS, "A", "B"]


class Compensation(abc.ABC):
    """One kind of compensation unit, an ``ai.rrcompile`` function ``Z = Y + G * up(down(X))``."""

    op_type: ClassVar[str]  # function name in the ai.rrcompile domain
    attributes: ClassVar[tuple[str, ...]]
    calibrated: ClassVar[bool] = False  # reads a per-chip gain ``A`` and offset ``B`` after ``G``
    branchless: ClassVar[bool] = False  # rank 0: only the gain and offset, no branch in the body

    @classmethod
    @abc.abstractmethod
    def branch(cls) -> list[onnx.NodeProto]:
        """Nodes computing ``up`` from ``X``, ``Wd`` and ``Wu``."""

    @staticmethod
    @abc.abstractmethod
    def apply(y: np.ndarray, x: np.ndarray, wd: np.ndarray, wu: np.ndarray, g: float, **attrs) -> np.ndarray:
        """Numpy reference of the function, used to test the ONNX version."""

    @staticmethod
    @abc.abstractmethod
    def rank(wd_shape: tuple[int, ...]) -> int:
        """The rank ``r`` of a unit whose down weight has shape ``wd_shape``."""

    @staticmethod
    @abc.abstractmethod
    def positions(out_shape: list[int | str]) -> list[int | str]:
        """The dims of one sample's output over which the unit repeats its ``r * (rows + cols)`` MACs."""

    @staticmethod
    @abc.abstractmethod
    def column_shape(cols: int, weight_rank: int) -> tuple[int, ...]:
        """Shape of a per-column gain or offset that broadcasts against the layer's output."""

    @classmethod
    def function_proto(cls) -> onnx.FunctionProto:
        nodes = [] if cls.branchless else [*cls.branch(), helper.make_node("Mul", ["G", "up"], ["correction"])]
        if cls.branchless:
            nodes += [helper.make_node("Mul", ["A", "Y"], ["scaled"]), helper.make_node("Add", ["scaled", "B"], ["Z"])]
        elif cls.calibrated:
            nodes += [helper.make_node("Mul", ["A", "Y"], ["scaled"]), helper.make_node("Add", ["scaled", "B"], ["shifted"]),
                      helper.make_node("Add", ["shifted", "correction"], ["Z"])]
        else:
            nodes.append(helper.make_node("Add", ["Y", "correction"], ["Z"]))
        return helper.make_function(
            RRCOMPILE_DOMAIN, cls.op_type, _CALIBRATION_INPUTS if cls.calibrated else _INPUTS, ["Z"], nodes,
            [helper.make_opsetid("", TARGET_OPSET)],
            attributes=list(cls.attributes), doc_string=(cls.__doc__ or "").strip().splitlines()[0],
        )


def _ref_ints(name: str) -> onnx.AttributeProto:
    """A Conv attribute inside a function body taking the function call's attribute ``name``."""
    return onnx.AttributeProto(name=name, ref_attr_name=name, type=onnx.AttributeProto.INTS)


class ConvCompensation(Compensation):
    """``Y + G * Conv(Conv(X, Wd), Wu)``: a rank-r convolution with the layer's geometry, then 1x1."""

    op_type = "ConvCompensation"
    attributes = ("strides", "pads", "dilations")

    @classmethod
    def branch(cls):
        down = helper.make_node("Conv", ["X", "Wd"], ["down"])
        down.attribute.extend(_ref_ints(a) for a in cls.attributes)
        return [down, helper.make_node("Conv", ["down", "Wu"], ["up"])]

    @staticmethod
    def apply(y, x, wd, wu, g, *, strides, pads, dilations):
        down = _conv(x, wd, strides, pads, dilations)
        up = _conv(down, wu, [1] * len(strides), [0] * len(pads), [1] * len(strides))
        return y + np.float32(g) * up

    @staticmethod
    def rank(wd_shape):
        return wd_shape[0]

    @staticmethod
    def positions(out_shape):
        return out_shape[2:]

    @staticmethod
    def column_shape(cols, weight_rank):
        return (cols,) + (1,) * (weight_rank - 2)  # channels on axis 1 of [N, C, *spatial]


class DenseCompensation(Compensation):
    """``Y + G * MatMul(MatMul(X, Wd), Wu)``: a rank-r factorization of a dense correction."""

    op_type = "DenseCompensation"
    attributes = ()

    @classmethod
    def branch(cls):
        return [helper.make_node("MatMul", ["X", "Wd"], ["down"]), helper.make_node("MatMul", ["down", "Wu"], ["up"])]

    @staticmethod
    def apply(y, x, wd, wu, g):
        return y + np.float32(g) * ((x @ wd) @ wu)

    @staticmethod
    def rank(wd_shape):
        return wd_shape[1]

    @staticmethod
    def positions(out_shape):
        return out_shape[1:-1]

    @staticmethod
    def column_shape(cols, weight_rank):
        return (cols,)  # features on the last axis


class ConvCalibration(ConvCompensation):
    """``A * Y + B + G * Conv(Conv(X, Wd), Wu)``: a conv compensation whose weights are solved per chip."""

    op_type = "ConvCalibration"
    calibrated = True

    @staticmethod
    def apply(y, x, wd, wu, g, a, b, *, strides, pads, dilations):
        compensated = ConvCompensation.apply(np.zeros_like(y), x, wd, wu, g, strides=strides, pads=pads, dilations=dilations)
        return a * y + b + compensated


class DenseCalibration(DenseCompensation):
    """``A * Y + B + G * MatMul(MatMul(X, Wd), Wu)``: a dense compensation whose weights are solved per chip."""

    op_type = "DenseCalibration"
    calibrated = True

    @staticmethod
    def apply(y, x, wd, wu, g, a, b):
        return a * y + b + np.float32(g) * ((x @ wd) @ wu)


class ConvGainOffset(ConvCalibration):
    """``A * Y + B``: a rank-0 conv calibration slot (X, Wd, Wu and G are read by the signature only).

    Its own function, not ``ConvCalibration`` with a 0-channel ``Wd``: onnxruntime 1.30's NCHWc
    layout pass fails on a convolution to 0 channels ("ReorderOutput ... invalid channel count").
    """

    op_type = "ConvGainOffset"
    branchless = True

    @staticmethod
    def apply(y, x, wd, wu, g, a, b, **attrs):
        return a * y + b


class DenseGainOffset(DenseCalibration):
    """``A * Y + B``: a rank-0 dense calibration slot (X, Wd, Wu and G are read by the signature only)."""

    op_type = "DenseGainOffset"
    branchless = True

    @staticmethod
    def apply(y, x, wd, wu, g, a, b):
        return a * y + b


COMPENSATIONS: dict[str, type[Compensation]] = {
    cls.op_type: cls for cls in (ConvCompensation, DenseCompensation, ConvCalibration, DenseCalibration,
                                 ConvGainOffset, DenseGainOffset)}


def calibration_kind(op: str, rank: int) -> type[Compensation]:
    """The calibration slot's function for an analog ``op`` (Conv, Gemm, MatMul) at ``rank``."""
    if op == "Conv":
        return ConvCalibration if rank else ConvGainOffset
    return DenseCalibration if rank else DenseGainOffset


def is_compensation(node: onnx.NodeProto) -> bool:
    """Whether ``node`` is a compensation unit (trained or calibratable): an ``ai.rrcompile`` call of one."""
    return node.domain == RRCOMPILE_DOMAIN and node.op_type in COMPENSATIONS


def _conv(x: np.ndarray, w: np.ndarray, strides, pads, dilations) -> np.ndarray:
    """N-d convolution (group 1, no bias) in float64, the reference ONNX Conv is checked against."""
    spatial = len(strides)
    x = np.pad(x.astype(np.float64), [(0, 0), (0, 0), *zip(pads[:spatial], pads[spatial:])])
    kernel = w.shape[2:]
    out_shape = [(x.shape[2 + i] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1 for i in range(spatial)]
    out = np.zeros((x.shape[0], w.shape[0], *out_shape))
    for offset in np.ndindex(*kernel):
        window = tuple(
            slice(offset[i] * dilations[i], offset[i] * dilations[i] + (out_shape[i] - 1) * strides[i] + 1, strides[i])
            for i in range(spatial)
        )
        out += np.einsum("nc...,oc->no...", x[(slice(None), slice(None), *window)], w[(slice(None), slice(None), *offset)])
    return out.astype(np.float32)


def weights_per_rank(layer: AnalogLayer) -> int:
    """Digital weights one rank of a layer's compensation costs: a crossbar's rows plus columns."""
    return layer.rows + layer.cols


def rank_for_budget(layer: AnalogLayer, budget: float) -> int:
    """The largest rank whose weights stay within ``budget * layer.params``, at least 1.

    Capped at ``min(rows, cols)``: a higher rank adds weights without adding expressive power.
    """
    affordable = math.floor(budget * layer.params / weights_per_rank(layer))
    return max(1, min(affordable, layer.rows, layer.cols))


@dataclasses.dataclass(frozen=True)
class Candidate:
    layer: str  # the analog layer's node name
    node: str  # the compensation node's name
    op: str  # one of COMPENSATIONS
    rank: int
    weights: int  # digital weights: size of Wd + Wu (+ A + B when calibrated)
    macs: int | None  # per sample, None when the output shape is not known
    down: str  # initializer names
    up: str
    gate: str
    gain: str | None = None  # per-chip, calibrated compensation only
    offset: str | None = None

    @property
    def calibrated(self) -> bool:
        return self.gain is not None


def candidates(model: onnx.ModelProto) -> list[Candidate]:
    """Every compensation node in graph order, with its layer and costs."""
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    producer = {out: node.name for node in model.graph.node for out in node.output}
    producer.update(tiled_outputs(model))  # a tiled layer's output is its tiles' sum, the layer is the analog node
    shapes = tensor_shapes(model)
    found = []
    for node in model.graph.node:
        if not is_compensation(node):
            continue
        kind = COMPENSATIONS[node.op_type]
        down, up, gate = node.input[2:5]
        gain, offset = node.input[5:7] if kind.calibrated else (None, None)
        # each output position multiplies by every weight once: Wd's r x (Cin kh kw), then Wu's Cout x r
        branch = math.prod(inits[down]) + math.prod(inits[up])
        columns = math.prod(inits[gain]) + math.prod(inits[offset]) if kind.calibrated else 0
        out_shape = shapes.get(node.output[0])
        positions = None if out_shape is None else kind.positions(out_shape)
        known = positions is not None and all(isinstance(d, int) and d > 0 for d in positions)
        # a gain and an offset cost one multiply-add per output value: a column's share per position
        found.append(Candidate(producer[node.input[0]], node.name, node.op_type, kind.rank(inits[down]), branch + columns,
                               (branch + columns // 2) * math.prod(positions) if known else None, down, up, gate,
                               gain, offset))
    return found
