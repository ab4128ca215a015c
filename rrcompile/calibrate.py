"""Per-chip calibration: measure a programmed chip, solve its compensation in closed form.

Every programmed chip is different, so compensation fixed at compile time can only repair the
error all chips share. Calibration repairs each chip's own: after programming, a few unlabeled
images run through the chip; at every analog layer that carries a calibratable compensation
(``rrcompile.compensation.ConvCalibration`` / ``DenseCalibration``, or a rank-0 ``*GainOffset``),
the layer's raw output ``Y`` is compared with the output ``T`` the digital twin gives there: by
default the clean network's output at that layer on the same images (so a slot also takes out the
error arriving from the layers before it: LeNet-5 at sigma 0.5, 98.29% against 98.02%), or the
ideal ``W x + b`` on the input ``x`` the chip's layer saw (``target="layer"``, for measurements of
an uncalibrated chip taken in one pass). The slot's per-chip parameters are the ridge
least-squares solution of

    T ~ A * Y + B + Wu (Wd x)        (per output column j: a_j, b_j and the row u_j of Wu)

Only the slot's rank is fixed at compile time. ``Wd`` is the chip's own too
(:func:`chip_projection`, reduced-rank ridge regression of the chip's error on its layer input):
a chip's error is a random matrix applied to ``x``, and the ``r`` directions where *this* chip's
error is largest beat the directions where sampled chips' errors are largest on average
(:func:`fit_projections`, kept as ``projection="compiled"``). LeNet-5 as shipped, ranks 4/2/1/0/4,
chips 0-7, 256 images (``python bench/calibration_forms.py --sigma S``): at sigma 0.5, 98.68%
mean (worst 98.43%) against 98.44% (98.07%) with compiled directions; at sigma 0.7, 97.80%
(97.33%) against 97.00% (95.60%). The gain and offset earn their ``2 * cols`` weights (without
them, 97.65% and 91.50%), and so does the network target (the layer target, compiled
directions: 97.97% and 93.89%). How hard the projection's fit is regularized is chosen per chip
and layer, by how well a fit on half the calibration images predicts the error on the other half:
no single ridge suited every layer (a fixed 0.01 left one LeNet-5 chip in 100 at 97.78% where 0.1
gave 98.56%). Given ``Wd``, no labels, no gradient descent: one
linear solve of size ``rank + 2`` per column. The ridge pulls every parameter toward "no
correction" (gain 1, offset 0, up 0) in proportion to its own feature energy, so read noise and
stuck cells, which make ``Y`` partly unpredictable, shrink the correction instead of breaking it.
Least squares under strong read noise shrinks the outputs as well: with read noise alone at
``eta=0.2`` (no lasting variation to correct), a calibrated digits chip is worse than a raw one.

Layers are calibrated in graph order, in one pass: when layer ``l`` is reached its inputs already
come through the calibrated layers before it, which is what the chip sees once deployed.

:class:`Chip` is the part of a chip-in-the-loop harness the compiler needs: run one analog layer of
the programmed chip on given inputs and return its raw outputs. :class:`SimulatedChip` implements
it with the same draws as the Monte Carlo evaluator (chip ``k`` of seed ``s`` is the same chip
everywhere). Real hardware measured elsewhere comes as a measurement file
(:func:`load_measurements`): for each calibrated layer, the inputs it saw and the outputs it gave.
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from rrcompile.compensation import Candidate, calibration_kind, candidates, weights_per_rank
from rrcompile.crossbar import is_adc, layer_torch
from rrcompile.devices import Adc, DeviceConfig, DeviceModel, crossbar_models, is_variation, noise_inputs, weight_models
from rrcompile.errors import DataError
from rrcompile.evaluate import BATCH_SIZE, ChipStats, MonteCarloEvaluator, draw_chip
from rrcompile.executor import IN_PROCESS, ChipExecutor
from rrcompile.graph import (
    RRCOMPILE_DOMAIN, AnalogLayer, analog_layers, model_io, remove_unused_functions, with_initializers,
)
from rrcompile.io import atomic_write
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.torch_graph import OPS, TorchGraph, _attributes, default_device, op_key

# a measurement file: the calibration images, and per calibrated layer what it saw and gave
IMAGES, INPUT_SUFFIX, OUTPUT_SUFFIX = "images", ".input", ".output"
TARGETS = ("network", "layer")
PROJECTIONS = ("chip", "compiled")
# unlabeled images a chip is calibrated on (compile's validation and report chips, `rrcompile calibrate`)
CALIBRATION_IMAGES = 256
# the per-chip projection's ridges to choose from (relative to each input feature's energy). No one
# value suits every layer and chip: a convolution fits on thousands of patches per image, a dense
# layer on one row per image
PROJECTION_RIDGES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
ONE_IMAGE_PROJECTION_RIDGE = 0.01  # a single calibration image cannot be split to choose


class CalibrationError(DataError):
    """Measurements that cannot calibrate the model (missing layer, wrong shape, non-finite values)."""


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    ridge: float = 1e-3  # relative to each feature's energy: 0 is plain least squares
    affine: bool = True  # solve the per-column gain and offset (else they stay 1 and 0)
    # what a layer's corrected output should match: "network", the clean network's output at that
    # layer on the same image (so a slot also takes out error arriving from the layers before it);
    # "layer", the ideal ``W x`` on the input the chip's layer saw
    target: str = "network"
    # where the branch's down projection comes from: "chip", solved per chip with the rest
    # (:func:`chip_projection`); "compiled", fixed at compile time (:func:`fit_projections`)
    projection: str = "chip"
    # relative, as ``ridge``: of the full fit the per-chip projection is cut from; None: chosen per
    # chip and layer from PROJECTION_RIDGES by held-out error (:func:`chip_projection`)
    projection_ridge: float | None = None

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"calibration target {self.target!r}: expected one of {', '.join(TARGETS)}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"calibration projection {self.projection!r}: expected one of {', '.join(PROJECTIONS)}")
        for name in ("ridge", "projection_ridge"):
            value = getattr(self, name)
            if value is None and name == "projection_ridge":
                continue
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"calibration {name.replace('_', ' ')} {value}: must be a finite number >= 0")


class Chip(abc.ABC):
    """A programmed chip, seen through the calibration harness."""

    @abc.abstractmethod
    def run_layer(self, layer: str, x: np.ndarray) -> np.ndarray:
        """The raw output of analog layer ``layer`` (node name) on inputs ``x``, as the chip computes it."""


def _layer_nodes(model: onnx.ModelProto) -> dict[str, tuple[onnx.NodeProto, dict, AnalogLayer]]:
    layers = {layer.node: layer for layer in analog_layers(model)}
    return {n.name: (n, _attributes(n), layers[n.name]) for n in model.graph.node if n.name in layers}


def programmed_weights(model: onnx.ModelProto, device: DeviceConfig, feed: Mapping[str, np.ndarray],
                       read_rng: np.random.Generator | None = None, *, only: str | None = None) -> dict[str, np.ndarray]:
    """Each varied layer's programmed weight (by node name; ``only`` that layer) under ``device``,
    from the noise ``feed`` (named like the varied graph's noise inputs); read noise is drawn from
    ``read_rng`` when given, else left out."""
    inits = {t.name: t for t in model.graph.initializer}
    weights = {}
    for layer in analog_layers(model):
        stack = weight_models(device.for_layer(layer.node, layer.weight))  # tiles and ADCs act on the outputs
        if not stack or only not in (None, layer.node):
            continue
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        w_range = np.float32(np.abs(w).max())
        for device_model in stack:
            noise = None
            if device_model.noise is not None:
                name = f"{layer.node}.{device_model.kind}_noise"
                if device_model.noise.per == "chip":
                    noise = feed[name]
                elif read_rng is not None:
                    noise = device_model.noise.draw(read_rng, w.shape)
                else:
                    continue
            w = device_model.apply(w, w_range, noise).astype(np.float32)
        weights[layer.node] = w
    return weights


class SimulatedChip(Chip):
    """Chip ``index`` of seed ``seed`` under ``device``: the Monte Carlo evaluator's chip, layer by layer.

    With read noise, every ``READ_CHUNK`` images are a read of their own (fresh read noise, from a
    stream of the chip's that the evaluator does not use): one read for all calibration images
    would make its noise look like the chip's lasting error, and calibration would fit it
    (``read:eta=0.2``: 47% calibrated against 66% raw, over 5 digits chips, with a single read).
    ADC noise, drawn per inference too, is read the same way. A layer with ``tile`` or ``adc``
    terms runs on its crossbar (:func:`rrcompile.crossbar.layer_torch`: per-tile partial sums,
    converted with the ADC ranges the device carries, then summed), so calibration sees the
    converters' error as part of the chip's.
    """

    READ_CHUNK = 16

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, seed: int, index: int, *,
                 varied: onnx.ModelProto | None = None):
        self.seed, self.index = seed, index
        self._model, self._device = model, device
        self._layers = _layer_nodes(model)
        varied = varied if varied is not None else InsertVariationPass(device)(model).model
        self._feed = draw_chip(varied, seed, index)
        self._reads = any(m.noise.per == "inference" if isinstance(m, DeviceModel) and m.noise is not None
                          else isinstance(m, Adc) and m.random for s in device.stacks() for m in s)
        self._read_rng = np.random.default_rng([seed, index, 2])
        self._weights = programmed_weights(model, device, self._feed) if not self._reads else {}
        self._inits = {t.name: t for t in model.graph.initializer}

    def run_layer(self, layer: str, x: np.ndarray) -> np.ndarray:
        if not self._reads:
            return self._run(layer, x, self._weights)
        return np.concatenate([
            self._run(layer, x[start:start + self.READ_CHUNK],
                      programmed_weights(self._model, self._device, self._feed, self._read_rng, only=layer))
            for start in range(0, len(x), self.READ_CHUNK)])

    def _run(self, layer: str, x: np.ndarray, weights: Mapping[str, np.ndarray]) -> np.ndarray:
        node, attrs, analog = self._layers[layer]
        inputs = [torch.from_numpy(np.ascontiguousarray(x, np.float32))]
        for index, name in enumerate(node.input[1:], start=1):
            if index == 1 and layer in weights:
                inputs.append(torch.from_numpy(weights[layer]))
            else:
                inputs.append(torch.from_numpy(numpy_helper.to_array(self._inits[name]).copy()) if name else None)
        op = OPS[op_key(node)]
        tile, adc = crossbar_models(self._device.for_layer(analog.node, analog.weight))
        with torch.no_grad():
            if tile is None and adc is None:
                return op(inputs, attrs)[0].numpy()
            return layer_torch(node, analog, attrs, lambda data, weight: op([data, weight], attrs)[0], inputs[0],
                               inputs[1], inputs[2] if len(inputs) > 2 else None, tile, adc,
                               self._device.adc_ranges.get(layer),
                               lambda shape: torch.from_numpy(self._read_rng.standard_normal(shape, dtype=np.float32)),
                               ).numpy()


@dataclasses.dataclass
class Slot:
    """A calibratable compensation node and how to compute its branch input ``Wd x``."""

    candidate: Candidate
    node: onnx.NodeProto
    attrs: dict
    layer: AnalogLayer

    @property
    def is_conv(self) -> bool:
        return self.layer.op == "Conv"


def slots(model: onnx.ModelProto) -> list[Slot]:
    """The calibratable compensation nodes of ``model``, in graph order."""
    layers = {layer.node: layer for layer in analog_layers(model)}
    by_name = {n.name: n for n in model.graph.node}
    return [Slot(c, by_name[c.node], _attributes(by_name[c.node]), layers[c.layer]) for c in candidates(model) if c.calibrated]


def _down(slot: Slot, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """``Wd x`` as rows of features: [positions, rank]."""
    if slot.is_conv:
        hidden = OPS["Conv"]([x, down], {k: slot.attrs[k] for k in ("strides", "pads", "dilations")})[0]
        return hidden.movedim(1, -1).reshape(-1, down.shape[0])
    return (x @ down).reshape(-1, down.shape[1])


def _columns(slot: Slot, y: torch.Tensor) -> torch.Tensor:
    """A layer output as rows of columns: [positions, cols]."""
    return y.movedim(1, -1).reshape(-1, y.shape[1]) if slot.is_conv else y.reshape(-1, y.shape[-1])


def _patches(slot: Slot, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as the rows its weight multiplies (im2col patches for a conv), in the
    order :func:`_columns` gives the outputs: [positions, rows]."""
    return _patch_columns(slot, x).T


def _patch_columns(slot: Slot, x: torch.Tensor) -> torch.Tensor:
    """:func:`_patches` as [rows, positions]: for a conv, the layout im2col gives each image, so
    this copies once where [positions, rows] copies twice."""
    if not slot.is_conv:
        return x.reshape(-1, slot.layer.rows).T
    attrs = slot.attrs
    spatial = x.dim() - 2
    if spatial not in (1, 2):
        raise CalibrationError(f"layer '{slot.layer.node}': calibration supports 1-d and 2-d convolutions")
    pads, strides, dilations = attrs["pads"], attrs["strides"], attrs["dilations"]
    kernel = slot.layer.weight_shape[2:]
    if spatial == 1:
        x, kernel = x.unsqueeze(2), (1, *kernel)
        pads, strides, dilations = [0, pads[0], 0, pads[1]], [1, *strides], [1, *dilations]
    padded = F.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    per_image = F.unfold(padded, kernel, dilation=dilations, stride=strides)  # [images, rows, positions]
    return per_image.transpose(0, 1).reshape(slot.layer.rows, -1)


def _ridge(diagonal: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge of a Gram matrix (or a batch of them) with ``diagonal``: each feature's own energy
    sets its ridge, so it is scale-free, and a dead feature (all zero) stays at 0."""
    return ridge * diagonal + 1e-12 * diagonal.amax(dim=-1, keepdim=True).clamp_min(1e-30)


@dataclasses.dataclass
class _Moments:
    """Sums over some images of a layer's input rows ``p`` and its error rows ``e``: what a ridge fit
    of ``e`` on ``p`` and its squared error on other rows need."""
    gram: torch.Tensor  # sum p p^T
    cross: torch.Tensor  # sum p e^T
    inputs: torch.Tensor  # sum p
    errors: torch.Tensor  # sum e
    energy: torch.Tensor  # sum |e|^2
    count: int

    def __add__(self, other: "_Moments") -> "_Moments":
        return _Moments(self.gram + other.gram, self.cross + other.cross, self.inputs + other.inputs,
                        self.errors + other.errors, self.energy + other.energy, self.count + other.count)

    def centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gram, cross, energy) about the means: the offset takes the mean."""
        mean, error_mean = self.inputs / self.count, self.errors / self.count
        return (self.gram - self.count * torch.outer(mean, mean), self.cross - torch.outer(mean, self.errors),
                self.energy - self.count * (error_mean * error_mean).sum())


def _moments(slot: Slot, x: torch.Tensor, error: torch.Tensor, per_image: int) -> _Moments:
    gram = error.new_zeros(slot.layer.rows, slot.layer.rows)  # on the solve's device: a calibration may run on a GPU
    cross = error.new_zeros(slot.layer.rows, error.shape[1])
    inputs = error.new_zeros(slot.layer.rows)
    for start in range(0, len(x), 64):  # patches a chunk of images at a time: VGG-sized convs stay small
        columns = _patch_columns(slot, x[start:start + 64]).double()
        gram += columns @ columns.T
        cross += columns @ error[start * per_image:start * per_image + columns.shape[1]]
        inputs += columns.sum(1)
    return _Moments(gram, cross, inputs, error.sum(0), (error * error).sum(), len(error))


def _reduced_fit(gram: torch.Tensor, cross: torch.Tensor, ridge: torch.Tensor | float, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the full ridge fit ``M`` [rows, cols], its ``rank`` strongest output directions ``V`` [cols, r]);
    with a tensor of ridges, a batch of both, one per ridge ([ridges, rows, cols], [ridges, cols, r])."""
    ridges = torch.as_tensor(ridge, dtype=gram.dtype, device=gram.device).reshape(-1, 1)
    diagonal = torch.diagonal(gram)
    regularized = gram + torch.diag_embed(ridges * diagonal + _ridge(diagonal, 0.0))
    full = torch.linalg.solve(regularized, cross.expand(len(ridges), *cross.shape))
    fitted = full.transpose(1, 2) @ gram @ full
    eigenvalues, eigenvectors = torch.linalg.eigh((fitted + fitted.transpose(1, 2)) / 2)
    top = torch.gather(eigenvectors, 2, torch.argsort(eigenvalues, dim=1, descending=True)[:, None, :rank]
                       .expand(-1, eigenvectors.shape[1], -1))
    return (full, top) if torch.is_tensor(ridge) else (full[0], top[0])


def _held_out_ridge(folds: list[_Moments], rank: int) -> float:
    """The ridge of PROJECTION_RIDGES whose rank-``rank`` fit on one fold best predicts the other's
    error (squared error summed over both ways round). All ridges are fitted as one batch: the
    systems are small, and one call each instead of seven halves a LeNet-5 chip's projections."""
    centred = [fold.centred() for fold in folds]
    ridges = torch.tensor(PROJECTION_RIDGES, dtype=centred[0][0].dtype, device=centred[0][0].device)
    losses = torch.zeros_like(ridges)
    for (gram, cross, _), (held_gram, held_cross, held_energy) in (centred, centred[::-1]):
        full, top = _reduced_fit(gram, cross, ridges, rank)
        correction = full @ top @ top.transpose(1, 2)
        losses += held_energy - 2 * (correction * held_cross).sum((1, 2)) + (correction * (held_gram @ correction)).sum((1, 2))
    return PROJECTION_RIDGES[int(torch.argmin(losses))]


def chip_projection(slot: Slot, x: torch.Tensor, error: torch.Tensor, rank: int, ridge: float | None) -> torch.Tensor:
    """The down projection of ``rank`` that best explains this chip's ``error`` (ideal minus raw
    output, as [positions, cols]) from the layer input ``x``: reduced-rank ridge
    regression. The full correction ``M`` is fitted first; its ``rank`` strongest output directions
    ``V`` (top eigenvectors of the fitted values' covariance ``M^T G M``) keep ``Wd = V^T M^T``.
    ``ridge`` None: the one of PROJECTION_RIDGES whose fit on half the images best predicts the
    error on the other half, and back (unlabeled, closed form: each half's moments are summed anyway).
    Shaped like the slot's down initializer."""
    per_image = len(error) // len(x)
    half = len(x) // 2
    if ridge is None and half:
        folds = [_moments(slot, x[:half], error[:half * per_image], per_image),
                 _moments(slot, x[half:], error[half * per_image:], per_image)]
        ridge, whole = _held_out_ridge(folds, rank), folds[0] + folds[1]
    else:
        whole = _moments(slot, x, error, per_image)
    gram, cross, _ = whole.centred()
    full, top = _reduced_fit(gram, cross, ONE_IMAGE_PROJECTION_RIDGE if ridge is None else ridge, rank)
    down = full @ top  # [rows, min(r, cols)]: a correction of the cols outputs has rank cols at most
    down = down / down.norm(dim=0, keepdim=True).clamp_min(1e-30)
    down = torch.cat([down, down.new_zeros(slot.layer.rows, rank - down.shape[1])], dim=1)
    if slot.is_conv:
        return down.T.reshape(rank, *slot.layer.weight_shape[1:]).float()
    return down.float()


def solve_tensors(slot: Slot, x: torch.Tensor, y: torch.Tensor, ideal: torch.Tensor, down: torch.Tensor,
                  config: CalibrationConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(down, up, gain, offset) of ``slot`` for one chip, shaped like its initializers, from the
    chip's layer input ``x`` and raw output ``y`` and the output ``ideal`` it should have given;
    ``down`` is the compiled one unless the config solves it per chip."""
    measured, wanted = _columns(slot, y), _columns(slot, ideal)
    if config.projection == "chip" and down.numel():
        rank = down.shape[0] if slot.is_conv else down.shape[1]
        # the directions come from the whole error, not what a gain leaves of it: a gain fitted
        # first mixes the layer's own weights into the residual, which then is no longer low rank
        down = chip_projection(slot, x, wanted.double() - measured.double(), rank, config.projection_ridge)
    column_shape = (measured.shape[1],) + (1,) * (y.dim() - 2) if slot.is_conv else (measured.shape[1],)
    return (down, *_solve_given(slot, x, measured, wanted, down, config, column_shape))


def _solve_given(slot: Slot, x: torch.Tensor, measured: torch.Tensor, wanted: torch.Tensor, down: torch.Tensor,
                 config: CalibrationConfig, column_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(up, gain, offset) for a given down projection, from the layer's raw and ideal outputs as
    columns (:func:`_columns`); the gain and offset come shaped ``column_shape``."""
    raw, error = measured.double(), (wanted - measured).double()
    # a rank-0 slot (gain and offset only) has no branch to run (torch has no 0-channel conv)
    features = _down(slot, x, down).double() if down.numel() else raw.new_zeros(len(raw), 0)
    rank, cols = features.shape[1], raw.shape[1]
    if not config.affine and not rank:  # nothing to solve: a rank-0 slot with its gain and offset held
        return down.new_zeros(cols, 0, *down.shape[2:]) if slot.is_conv else down.new_zeros(0, cols), \
            measured.new_ones(column_shape), measured.new_zeros(column_shape)
    if config.affine:
        shared = torch.cat([features, features.new_ones(len(features), 1)], dim=1)  # [M, r + 1]
        # per column j the features are [y_j, shared]: a batched (r + 2)-square system
        cross = shared.T @ raw  # [r + 1, cols]
        top = torch.cat([(raw * raw).sum(0)[:, None, None], cross.T[:, None, :]], dim=2)  # [cols, 1, r + 2]
        bottom = torch.cat([cross.T[:, :, None], (shared.T @ shared).expand(cols, rank + 1, rank + 1)], dim=2)
        gram = torch.cat([top, bottom], dim=1)
        rhs = torch.cat([(raw * error).sum(0, keepdim=True), shared.T @ error], dim=0).T  # [cols, r + 2]
    else:
        gram = (features.T @ features).expand(cols, rank, rank)
        rhs = (features.T @ error).T
    diagonal = torch.diagonal(gram, dim1=1, dim2=2)
    solution = torch.linalg.solve(gram + torch.diag_embed(_ridge(diagonal, config.ridge)),
                                  rhs.unsqueeze(-1)).squeeze(-1)  # [cols, features]
    if config.affine:
        gain, offset, up = 1 + solution[:, 0], solution[:, -1], solution[:, 1:-1]
    else:
        gain, offset, up = solution.new_ones(cols), solution.new_zeros(cols), solution
    up = up.reshape(cols, rank, *[1] * (down.dim() - 2)) if slot.is_conv else up.T
    return up.float(), gain.float().reshape(column_shape), offset.float().reshape(column_shape)


def solve(slot: Slot, x: torch.Tensor, y: torch.Tensor, ideal: torch.Tensor, down: torch.Tensor,
          config: CalibrationConfig) -> dict[str, np.ndarray]:
    """:func:`solve_tensors` as initializer values (name -> array)."""
    down, up, gain, offset = solve_tensors(slot, x, y, ideal, down, config)
    c = slot.candidate
    values = {c.up: up.detach().cpu().numpy(), c.gain: gain.detach().cpu().numpy(),
              c.offset: offset.detach().cpu().numpy()}
    if config.projection == "chip" and down.numel():
        values[c.down] = down.detach().cpu().numpy()
    return values


def calibrated_forward(module: TorchGraph, found: list[Slot], x: torch.Tensor, config: CalibrationConfig) -> torch.Tensor:
    """The output of a varied model's chip (one draw of ``module``'s noise) calibrated on ``x`` itself.

    The clean network (the variation ops and ADCs bypassed) gives every slot's target on the same batch;
    then the chip runs and each slot is solved in closed form as it is reached. The solved
    parameters are constants to the gradient (through the solve, the gradient of a gain on a
    nearly dead column explodes: LeNet-5 fell to 92% clean in 5 epochs), so training learns
    weights that work once their chip is calibrated.
    """
    by_node = {slot.candidate.node: slot for slot in found}

    def exact(node: onnx.NodeProto, attrs: dict, inputs: list) -> list | None:
        # the clean network: no weight effect and ideal converters (tiles alone change nothing)
        return [inputs[0]] if is_variation(node) or is_adc(node) else None

    with torch.no_grad():  # the targets are what the chip should give, not something to train
        target = module(x, outputs=[slot.node.input[0] for slot in found], intercept=exact)

    def calibrate(node: onnx.NodeProto, attrs: dict, inputs: list) -> list | None:
        slot = by_node.get(node.name)
        if slot is None:
            return None
        with torch.no_grad():
            down, up, gain, offset = solve_tensors(slot, inputs[1], inputs[0], target[node.input[0]], inputs[2], config)
        return OPS[op_key(node)]([*inputs[:2], down, up, inputs[4], gain, offset], attrs)

    return module(x, intercept=calibrate)


@dataclasses.dataclass
class ChipCalibration:
    """One chip's calibration: the per-chip initializer values, and what was measured to get them."""

    values: dict[str, np.ndarray]
    measurements: dict[str, np.ndarray]  # "<layer>.input" / "<layer>.output", as a measurement file holds

    def apply(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """A copy of ``model`` with this chip's parameters in its initializers: the chip's own graph."""
        return with_initializers(model, self.values)


class Calibrator:
    """Calibrates chips of one model (a compiled model with calibratable compensation); the digital
    twin and the solves run on torch's ``device_type`` (``cpu``, ``cuda`` or ``auto``)."""

    def __init__(self, model: onnx.ModelProto, config: CalibrationConfig = CalibrationConfig(), *,
                 device_type: str = "cpu"):
        self.model, self.config = model, config
        self.device = default_device(device_type)
        self.slots = slots(model)
        if not self.slots:
            raise CalibrationError("the model has no calibratable compensation (compile it with calibration on)")
        self._by_node = {s.candidate.node: s for s in self.slots}
        self._by_layer = {s.layer.node: s for s in self.slots}
        self._layers = _layer_nodes(model)
        self._graph = TorchGraph(model, trainable=[]).to(self.device)
        self._inits = {t.name: t for t in model.graph.initializer}
        self._clean: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # images, their clean outputs

    def calibrate(self, chip: Chip, x: np.ndarray, *, solve_slots: bool = True,
                  solves: dict | None = None) -> ChipCalibration:
        """Walk the layers in graph order on calibration images ``x``, measuring ``chip`` and solving
        each slot; with ``solve_slots`` False, only measure the uncalibrated chip in one pass (what a
        bring-up without the compiler in the loop records: calibrate it with the "layer" target).

        ``solves`` keeps simulated chips' slot solutions for calibrations of other rank
        configurations of the same model, on the same ``x`` and device (the agent's): a slot's
        solution depends only on its chip and the ranks of the slots up to it, in graph order."""
        values: dict[str, np.ndarray] = {}
        measurements: dict[str, np.ndarray] = {}
        ideal: dict[str, torch.Tensor] = {}
        ranks: list[int] = []  # of the slots reached so far
        reusable = solves is not None and isinstance(chip, SimulatedChip)
        batch = self._tensor(np.ascontiguousarray(x, np.float32))
        clean = self._clean_outputs(batch) if self.config.target == "network" else {}

        def intercept(node: onnx.NodeProto, attrs: dict, inputs: list) -> list | None:
            if node.name in self._layers:
                seen = inputs[0].cpu().numpy()  # the chip (simulated or real) is measured from the host
                raw = self._tensor(np.asarray(chip.run_layer(node.name, seen), np.float32))
                if node.name in self._by_layer:
                    ideal[node.output[0]] = clean[node.output[0]] if clean else OPS[op_key(node)](inputs, attrs)[0]
                    measurements[node.name + INPUT_SUFFIX] = seen.copy()
                    measurements[node.name + OUTPUT_SUFFIX] = raw.cpu().numpy().copy()
                return [raw]
            slot = self._by_node.get(node.name)
            if slot is None or not solve_slots:
                return None
            y, x_in = inputs[0], inputs[1]
            ranks.append(slot.candidate.rank)
            key = (chip.seed, chip.index, tuple(ranks)) if reusable else None
            target = ideal.pop(node.input[0])
            solved = solves.get(key) if key else None
            if solved is None:
                solved = solve(slot, x_in, y, target, inputs[2], self.config)
                if key:
                    solves[key] = solved
            values.update(solved)
            c = slot.candidate
            inputs = [*inputs[:2], self._tensor(solved[c.down]) if c.down in solved else inputs[2],
                      self._tensor(solved[c.up]), inputs[4], self._tensor(solved[c.gain]), self._tensor(solved[c.offset])]
            return OPS[op_key(node)](inputs, attrs)

        with torch.no_grad():
            self._graph(batch, intercept=intercept)
        return ChipCalibration(values, {IMAGES: np.array(x, np.float32), **measurements})

    def calibrate_measured(self, measurements: Mapping[str, np.ndarray], source: str = "measurements") -> ChipCalibration:
        """Solve every slot from measured layer inputs and outputs (a measurement file's arrays)."""
        self.check_measurements(measurements, source)
        values = {}
        images = self._tensor(np.asarray(measurements[IMAGES], np.float32))
        clean = self._clean_outputs(images) if self.config.target == "network" else {}
        with torch.no_grad():
            for slot in self.slots:
                node, attrs, _ = self._layers[slot.layer.node]
                x = self._tensor(np.asarray(measurements[slot.layer.node + INPUT_SUFFIX], np.float32))
                y = self._tensor(np.asarray(measurements[slot.layer.node + OUTPUT_SUFFIX], np.float32))
                if clean:
                    ideal = clean[node.output[0]]
                else:
                    ideal = OPS[op_key(node)]([x, *(self._constant(name) for name in node.input[1:])], attrs)[0]
                values.update(solve(slot, x, y, ideal, self._constant(slot.candidate.down), self.config))
        return ChipCalibration(values, dict(measurements))

    def _clean_outputs(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every calibrated layer's output in the clean network (the digital twin) on ``images``:
        the same for every chip calibrated on the same images, so computed once for them."""
        if self._clean is None or not torch.equal(self._clean[0], images):
            with torch.no_grad():
                self._clean = (images, self._graph(images, outputs=[self._layers[s.layer.node][0].output[0]
                                                                    for s in self.slots]))
        return self._clean[1]

    def _constant(self, name: str) -> torch.Tensor | None:
        return self._tensor(numpy_helper.to_array(self._inits[name]).copy()) if name else None

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array).to(self.device)

    def check_measurements(self, measurements: Mapping[str, np.ndarray], source: str) -> None:
        """One-line errors for a measurement set that cannot calibrate this model."""
        if IMAGES not in measurements:
            raise CalibrationError(f"{source}: no array '{IMAGES}' (the calibration images the chip was measured on)")
        images = np.asarray(measurements[IMAGES])
        expected = [d if isinstance(d, int) else None for d in self._graph_input_shape()[1:]]
        if images.ndim != len(expected) + 1 or any(e is not None and e != d for e, d in zip(expected, images.shape[1:])) \
                or not np.issubdtype(images.dtype, np.floating) or not len(images):
            raise CalibrationError(f"{source}: '{IMAGES}' of shape {list(images.shape)} and dtype {images.dtype} does not "
                                   f"fit the model input [N, {', '.join('?' if e is None else str(e) for e in expected)}]")
        if not np.all(np.isfinite(images)):
            raise CalibrationError(f"{source}: '{IMAGES}' holds {int(np.sum(~np.isfinite(images)))} non-finite values")
        # what each calibrated layer receives and gives in the digital twin, for one of these images
        with torch.no_grad():
            twin = self._graph(self._tensor(np.asarray(images[:1], np.float32)),
                               outputs=[name for s in self.slots for name in self._layers[s.layer.node][0].output[:1]
                                        + self._layers[s.layer.node][0].input[:1]])
        for slot in self.slots:
            node, attrs, layer = self._layers[slot.layer.node]
            names = [layer.node + INPUT_SUFFIX, layer.node + OUTPUT_SUFFIX]
            missing = [n for n in names if n not in measurements]
            if missing:
                raise CalibrationError(f"{source}: no array '{missing[0]}' for calibrated layer '{layer.node}'")
            x, y = (np.asarray(measurements[n]) for n in names)
            for name, array in zip(names, (x, y)):
                if not np.issubdtype(array.dtype, np.floating):
                    raise CalibrationError(f"{source}: '{name}' has dtype {array.dtype}, expected floating point")
                if not np.all(np.isfinite(array)):
                    raise CalibrationError(f"{source}: '{name}' holds {int(np.sum(~np.isfinite(array)))} non-finite values")
            for name, array, tensor in zip(names, (x, y), (node.input[0], node.output[0])):
                expected = (len(images), *twin[tensor].shape[1:])
                if tuple(array.shape) != expected:
                    raise CalibrationError(f"{source}: '{name}' has shape {list(array.shape)}, but layer '{layer.node}' "
                                           f"{'receives' if name == names[0] else 'gives'} {list(expected)} for "
                                           f"{len(images)} images")

    def _graph_input_shape(self) -> list[int | str]:
        return model_io(self.model)[1]


def load_measurements(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of a measurement file (``.npz``, no pickles): ``<layer>.input`` and ``<layer>.output``."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, AttributeError) as exc:
        raise CalibrationError(f"{path}: not a readable .npz measurement file ({str(exc).splitlines()[0] or type(exc).__name__})") from None


def save_measurements(measurements: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    with atomic_write(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **measurements)


def with_ranks(model: onnx.ModelProto, ranks: Mapping[str, int]) -> onnx.ModelProto:
    """A copy of ``model`` whose calibratable slots keep only their first ``ranks[layer]`` directions
    (the strongest where :func:`fit_projections` fitted them; a per-chip projection replaces them on
    every chip), with the up weights cut to match; a slot
    cut to rank 0 becomes its gain-and-offset function."""
    found = {s.layer.node: s for s in slots(model)}
    unknown = set(ranks) - set(found)
    if unknown:
        raise CalibrationError(f"no calibratable compensation at layer(s) {', '.join(sorted(unknown))}")
    result = onnx.ModelProto.FromString(model.SerializeToString())
    by_name = {t.name: t for t in result.graph.initializer}
    nodes = {n.name: n for n in result.graph.node}
    for layer, rank in ranks.items():
        slot = found[layer]
        if not 0 <= rank <= slot.candidate.rank:
            raise CalibrationError(f"layer '{layer}': rank {rank} outside 0..{slot.candidate.rank}")
        down = numpy_helper.to_array(by_name[slot.candidate.down])
        up = numpy_helper.to_array(by_name[slot.candidate.up])
        down, up = (down[:rank], up[:, :rank]) if slot.is_conv else (down[:, :rank], up[:rank])
        for name, value in ((slot.candidate.down, down), (slot.candidate.up, up)):
            by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
        kind = calibration_kind(slot.layer.op, rank)
        nodes[slot.candidate.node].op_type = kind.op_type
        if not any(f.name == kind.op_type and f.domain == RRCOMPILE_DOMAIN for f in result.functions):
            result.functions.append(kind.function_proto())
    remove_unused_functions(result)
    return result


def slot_weights(layer: AnalogLayer, rank: int) -> int:
    """Digital weights of a calibratable slot of ``rank``: down and up, then a gain and an offset per column."""
    return rank * weights_per_rank(layer) + 2 * layer.cols


class CalibratedEvaluator:
    """Monte Carlo accuracy of ``model``'s chips before and after each is calibrated on ``x_calibration``.

    Chip ``k`` is the evaluator's chip ``k``: the same draws measured, calibrated and evaluated.
    Chips are independent: ``evaluate`` hands them to an executor (``rrcompile.executor``), to
    which the evaluator travels as its recipe. ``device_type`` is where calibration and inference run.
    """

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, x_calibration: np.ndarray,
                 config: CalibrationConfig = CalibrationConfig(), *, batch_size: int = BATCH_SIZE,
                 device_type: str = "cpu", solves: dict | None = None):
        self.model, self.device, self.x_calibration = model, device, x_calibration
        self.solves = solves  # shared by the calibrations of rank configurations (Calibrator.calibrate); not pickled
        self.calibrator = Calibrator(model, config, device_type=device_type)
        self.evaluator = MonteCarloEvaluator(model, device, batch_size=batch_size, device_type=device_type)
        self._recipe = dict(model=model, device=device, x_calibration=x_calibration, config=config,
                            batch_size=batch_size, device_type=device_type)

    def __getstate__(self) -> dict:
        return self._recipe  # the torch graph and the sessions are rebuilt where it is unpickled

    def __setstate__(self, recipe: dict) -> None:
        self.__init__(**recipe)

    def calibrate(self, seed: int, chip: int) -> ChipCalibration:
        simulated = SimulatedChip(self.model, self.device, seed, chip, varied=self.evaluator.varied_model)
        return self.calibrator.calibrate(simulated, self.x_calibration, solves=self.solves)

    def chip_accuracy(self, x: np.ndarray, y: np.ndarray, seed: int, chip: int) -> float:
        return self.evaluator.chip_accuracy(x, y, seed, chip, self.calibrate(seed, chip).values)

    def both_accuracies(self, x: np.ndarray, y: np.ndarray, seed: int, chip: int) -> tuple[float, float]:
        """(uncalibrated, calibrated) accuracy of one chip."""
        return self.evaluator.chip_accuracy(x, y, seed, chip), self.chip_accuracy(x, y, seed, chip)

    def evaluate(self, x: np.ndarray, y: np.ndarray, samples: int, seed: int, *, progress: bool = True,
                 desc: str = "chips", executor: ChipExecutor = IN_PROCESS) -> tuple[ChipStats, ChipStats]:
        """(uncalibrated, calibrated) statistics over chips ``0 .. samples - 1``."""
        clean = self.evaluator.clean_accuracy(x, y)
        # without variation every chip is the same chip: measure and calibrate one
        measured = 1 if self.evaluator.identical_chips else samples
        pairs = executor.map_chips(functools.partial(self.both_accuracies, x, y, seed), range(measured),
                                   progress=progress, desc=f"{desc} (calibrated)")
        raw, calibrated = [list(column) for column in zip(*pairs)]
        return ChipStats(clean, raw * (samples // measured)), ChipStats(clean, calibrated * (samples // measured))


def calibrated_sigma_sweep(model: onnx.ModelProto, device: DeviceConfig, sigmas, x_calibration: np.ndarray,
                           x: np.ndarray, y: np.ndarray, samples: int, seed: int, *,
                           config: CalibrationConfig = CalibrationConfig(), progress: bool = True,
                           executor: ChipExecutor = IN_PROCESS, device_type: str = "cpu"):
    """(uncalibrated, calibrated): ChipStats per log-normal sigma over the same chips."""
    raw, calibrated = {}, {}
    for sigma in sigmas:
        evaluator = CalibratedEvaluator(model, device.with_sigma(sigma), x_calibration, config, device_type=device_type)
        raw[sigma], calibrated[sigma] = evaluator.evaluate(x, y, samples, seed, progress=progress, desc=f"sigma={sigma:g}",
                                                           executor=executor)
    return raw, calibrated


# --- compile time: the down projections --------------------------------------------------------

def _input_rows(slot: Slot, x: torch.Tensor, limit: int, generator: torch.Generator) -> torch.Tensor:
    """The layer's input rows (:func:`_patches`), at most ``limit`` of them, drawn at random."""
    rows = _patches(slot, x)
    if len(rows) > limit:
        rows = rows[torch.randperm(len(rows), generator=generator)[:limit]]
    return rows.double()


def _weight_matrix(layer: AnalogLayer, weight: np.ndarray, transposed: bool) -> np.ndarray:
    """A weight as [rows, cols]: input features by output features."""
    if layer.op == "Conv":
        return weight.reshape(weight.shape[0], -1).T
    return weight.T if transposed else weight


def fit_projections(model: onnx.ModelProto, device: DeviceConfig, x: np.ndarray, *, seed: int = 0, chips: int = 8,
                    max_rows: int = 200_000) -> onnx.ModelProto:
    """``model`` with every calibratable slot's down projection set to the error-weighted principal
    directions of its layer's inputs on ``x`` (training images, the clean network).

    Why these: with ``Wu`` solved per chip, the correction left is the chip's error on the part of
    ``x`` outside the span of ``Wd``'s rows. For a weight deviation ``D`` whose entries are
    independent, ``E||D r||^2 = sum_i s_i r_i^2`` with ``s_i`` the expected squared deviation of
    input row ``i`` (summed over columns), so the best rank-``r`` span is that of the top
    eigenvectors ``q`` of ``S^1/2 C S^1/2`` (``C`` the input covariance), and ``Wd = Q^T S^1/2``.
    ``s_i`` is measured on ``chips`` sampled chips (from a stream of their own, never the
    evaluation chips), so every device model weights rows its own way.
    """
    found = slots(model)
    if not found:
        return model
    graph = TorchGraph(model, trainable=[])
    inputs = {s.layer.node: s.node.input[1] for s in found}
    with torch.no_grad():
        values = graph(torch.from_numpy(np.ascontiguousarray(x, np.float32)), outputs=list(inputs.values()))
    inits = {t.name: t for t in model.graph.initializer}
    deviation = {s.layer.node: np.zeros(s.layer.rows) for s in found}
    transposed = {s.layer.node: _transposed(model, s.layer) for s in found}
    targets = {s.layer.node: _weight_matrix(s.layer, numpy_helper.to_array(inits[s.layer.weight]), transposed[s.layer.node])
               for s in found}
    varied = InsertVariationPass(device)(model)
    draws = noise_inputs(varied.model) if varied.modified else []
    generator = np.random.default_rng([seed, 0xF17])
    for _ in range(chips):
        feed = {n.name: n.noise.draw(generator, n.shape) for n in draws if n.noise.per == "chip"}
        programmed = programmed_weights(model, device, feed, generator)
        for slot in found:
            layer = slot.layer.node
            if layer in programmed:
                chip = _weight_matrix(slot.layer, programmed[layer], transposed[layer])
                deviation[layer] += ((chip - targets[layer]).astype(np.float64) ** 2).sum(axis=1) / chips
    torch_generator = torch.Generator().manual_seed(seed)
    result = onnx.ModelProto.FromString(model.SerializeToString())
    by_name = {t.name: t for t in result.graph.initializer}
    for slot in found:
        rows = _input_rows(slot, values[inputs[slot.layer.node]], max_rows, torch_generator)
        rows = rows - rows.mean(dim=0)  # the offset takes the mean
        covariance = (rows.T @ rows / max(1, len(rows) - 1)).numpy()
        weight = np.sqrt(deviation[slot.layer.node])
        if not weight.any():  # an exact layer: weight rows by input energy alone
            weight = np.ones_like(weight)
        eigenvalues, eigenvectors = np.linalg.eigh(weight[:, None] * covariance * weight[None, :])
        rank = slot.candidate.rank
        top = eigenvectors[:, np.argsort(eigenvalues)[::-1][:rank]]  # [rows, r]
        down = (top * weight[:, None]).T  # [r, rows]: features q^T S^1/2 x
        down /= np.maximum(np.linalg.norm(down, axis=1, keepdims=True), 1e-30)
        shape = tuple(by_name[slot.candidate.down].dims)
        value = down.reshape(shape) if slot.is_conv else down.T.reshape(shape)
        by_name[slot.candidate.down].CopyFrom(numpy_helper.from_array(value.astype(np.float32), slot.candidate.down))
    return result


def _transposed(model: onnx.ModelProto, layer: AnalogLayer) -> bool:
    """Whether a dense layer's weight is stored [cols, rows] (Gemm with transB)."""
    if layer.op != "Gemm":
        return False
    node = next(n for n in model.graph.node if n.name == layer.node)
    return bool(next((a.i for a in node.attribute if a.name == "transB"), 0))
