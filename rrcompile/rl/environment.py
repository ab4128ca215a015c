"""The compensation-selection environments: what to keep at each candidate, scored on fixed chips.

``CompensationEnv`` (trained compensation, the paper's): keep or drop each candidate.
``CalibrationEnv`` (calibrated compensation): choose each slot's rank, every chip calibrated.

An episode visits the compensation candidates in topological order of the networkx view; at each
the agent keeps (1) or drops (0) it (in ``CalibrationEnv``: chooses its rank). The reward, given once at the end, is

    mean validation accuracy over a fixed set of simulated chips  -  lambda * overhead

with ``overhead`` the kept candidates' digital weights over the analog weights (0.03 = 3 %); a
configuration above ``max_overhead`` (the user's budget) scores -1, below every valid one. The
chips are drawn once (seeded) and reused for every configuration, so configurations are compared
on the same hardware and the reward of a configuration is deterministic; it is computed once and
cached. The candidates' gates switch them on and off inside one onnxruntime graph per chip. In
``CalibrationEnv`` a configuration is a rank per slot and its reward is measured on calibrated chips.
The agent chooses only among configurations within the budget (``choices``).

The state of step ``t`` describes candidate ``t`` and the decisions so far (see ``FEATURES``):
the layer's depth, op, parameter count, MACs and spectral norm, its measured sensitivity (the
accuracy drop when only this layer varies), the feature-map error at its output with every layer
up to it varied, the candidate's cost, and the overhead already spent.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import networkx as nx
import numpy as np
import onnx
from onnx import helper, numpy_helper

from rrcompile.calibrate import CalibratedEvaluator, CalibrationConfig, slot_weights, with_ranks
from rrcompile.compensation import Candidate, candidates, weights_per_rank
from rrcompile.devices import DeviceConfig
from rrcompile.evaluate import BATCH_SIZE, MonteCarloEvaluator, accuracy, session_accuracy
from rrcompile.executor import IN_PROCESS, ChipExecutor
from rrcompile.graph import analog_layers, model_io, to_networkx
from rrcompile.lipschitz import SpectralReport
from rrcompile.passes.select_compensation import SelectCompensationPass

FEATURES = ("position", "depth", "is_conv", "log_params", "log_macs", "spectral_norm", "sensitivity",
            "feature_error", "cost", "spent")
# scales that bring each state feature near [0, 1] on the networks measured (LeNet-5 to VGG-size):
# parameter counts up to 10^7 and MACs up to 10^9, sensitivities and per-candidate costs of a few percent
LOG_PARAMS_SCALE, LOG_MACS_SCALE, PERCENT_SCALE = 7, 9, 10
# overheads are sums of fractions: a configuration exactly at the budget must not fail on rounding
OVERHEAD_TOLERANCE = 1e-12
OVER_BUDGET_REWARD = -1.0  # below every configuration within the budget (rewards are accuracies near [0, 1])
FEATURE_ERROR_IMAGES = 256  # images the feature-map error is measured on


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """What the agent knows about one candidate's layer before choosing."""

    layer: str
    depth: int
    op: str
    params: int
    macs: int
    spectral_norm: float
    sensitivity: float  # clean accuracy minus mean accuracy with only this layer varied
    feature_error: float  # ||varied - clean|| / ||clean|| at the layer output, every layer up to it varied
    candidate: Candidate


class CompensationEnv:
    """Rewards of keep/drop configurations of ``model``'s compensation candidates under ``device``.

    A configuration holds one value per step (candidate): here 0 drops it, 1 keeps it. ``executor``
    runs the chips of the layer profiles; the configurations' chips run here, one session per chip
    for them all.
    """

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, x: np.ndarray, y: np.ndarray, *,
                 chips: int = 8, seed: int = 0, overhead_weight: float = 1.0, max_overhead: float = 1.0,
                 batch_size: int = BATCH_SIZE, executor: ChipExecutor = IN_PROCESS):
        self.x, self.y = x, y
        self.executor = executor
        self.overhead_weight, self.max_overhead = overhead_weight, max_overhead
        self.input_name = model_io(model)[0]
        self.candidates = _topological(model, candidates(model))
        self.analog_weights = sum(layer.params for layer in analog_layers(model))
        self.evaluator = MonteCarloEvaluator(model, device, batch_size=batch_size, fold_slots=False)  # gates fed
        self.chips, self.seed = chips, seed
        self._chip_sessions: list | None = None
        self._rewards: dict[tuple[int, ...], tuple[float, float]] = {}
        self.profiles = _profiles(model, device, self.candidates, x, y, chips, seed, batch_size, executor)

    @property
    def steps(self) -> int:
        return len(self.candidates)

    width = 2  # how many options the agent sees at a step: drop or keep

    def levels(self, step: int) -> list[int]:
        """Every value step ``step`` may take, cheapest first: here 0 (dropped) and 1 (kept)."""
        return [0, 1]

    def choices(self, step: int, chosen: Sequence[int]) -> list[int]:
        """The agent's options at step ``step`` (at most ``width``, the cheapest first), given the
        values ``chosen[:step]``: the levels that keep the overhead within the budget with the
        cheapest level at every later step (the cheapest always, so an episode never dead-ends)."""
        trial = [*chosen[:step], *(self.levels(s)[0] for s in range(step, self.steps))]
        affordable = [self.levels(step)[0]]
        for level in self.levels(step)[1:]:
            trial[step] = level
            if self.overhead(trial) > self.max_overhead + OVERHEAD_TOLERANCE:
                break
            affordable.append(level)
        return affordable

    def gates(self, keep: Sequence[int]) -> dict[str, np.ndarray]:
        return {c.gate: np.array(float(k), dtype=np.float32) for c, k in zip(self.candidates, keep)}

    def overhead(self, keep: Sequence[int]) -> float:
        return sum(c.weights for c, k in zip(self.candidates, keep) if k) / self.analog_weights

    def accuracy(self, keep: Sequence[int]) -> float:
        """Mean accuracy over the fixed chips with the candidates ``keep`` switched on."""
        return self._score(tuple(int(k) for k in keep))[0]

    def reward(self, keep: Sequence[int]) -> float:
        return self._score(tuple(int(k) for k in keep))[1]

    def _score(self, keep: tuple[int, ...]) -> tuple[float, float]:
        if keep not in self._rewards:
            # without read noise a chip is a fixed session: build each once for all configurations
            if self._chip_sessions is None and not self.evaluator.read_noise:
                self._chip_sessions = [self.evaluator.chip(self.seed, c) for c in range(self.chips)]
            mean_accuracy = _mean_chip_accuracy(self.evaluator, self.x, self.y, self.chips, self.seed, self.gates(keep),
                                                self._chip_sessions)
            overhead = self.overhead(keep)
            within = overhead <= self.max_overhead + OVERHEAD_TOLERANCE
            reward = mean_accuracy - self.overhead_weight * overhead if within else OVER_BUDGET_REWARD
            self._rewards[keep] = (mean_accuracy, reward)
        return self._rewards[keep]

    def state(self, step: int, chosen: Sequence[int]) -> np.ndarray:
        """Features of candidate ``step`` given the values ``chosen[:step]`` (in ``FEATURES`` order)."""
        profile = self.profiles[step]
        max_depth = max(p.depth for p in self.profiles) or 1
        return np.array([
            step / max(1, self.steps - 1),
            profile.depth / max_depth,
            float(profile.op == "Conv"),
            math.log10(1 + profile.params) / LOG_PARAMS_SCALE,
            math.log10(1 + profile.macs) / LOG_MACS_SCALE,
            profile.spectral_norm / max(p.spectral_norm for p in self.profiles),
            profile.sensitivity * PERCENT_SCALE,
            profile.feature_error,
            profile.candidate.weights / self.analog_weights * PERCENT_SCALE,
            self.overhead([*chosen[:step], *(self.levels(s)[0] for s in range(step, self.steps))]) * PERCENT_SCALE,
        ], dtype=np.float32)


def _topological(model: onnx.ModelProto, found: list[Candidate]) -> list[Candidate]:
    order = {name: i for i, name in enumerate(nx.lexicographical_topological_sort(to_networkx(model)))}
    return sorted(found, key=lambda c: order[c.layer])


def _mean_chip_accuracy(evaluator: MonteCarloEvaluator, x, y, chips: int, seed: int, fixed: dict[str, np.ndarray],
                        sessions: list | None = None) -> float:
    """Mean accuracy over chips ``0..chips-1`` of ``seed``, with ``fixed`` added to every feed (the gates)."""
    accuracies = []
    for chip in range(chips):
        session, feed = sessions[chip] if sessions else evaluator.chip(seed, chip)
        accuracies.append(session_accuracy(session, evaluator.input_name, x, y, evaluator.batch_size,
                                           lambda: {**feed(), **fixed}))
    return float(np.mean(accuracies))


def _profiles(model, device, found, x, y, chips, seed, batch_size, executor: ChipExecutor) -> list[LayerProfile]:
    """Per-candidate layer features, measured with every compensation switched off; ``executor``
    runs the chips of each layer's sensitivity."""
    view = to_networkx(model)
    layers = {layer.node: layer for layer in analog_layers(model)}
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    norms = SpectralReport.of([(layers[c.layer], weights[layers[c.layer].weight]) for c in found]).norms
    # a candidate switched off passes its layer's output on unchanged (``Y + 0 * branch``; a
    # calibration slot as inserted has gain 1 and offset 0), so the network without them gives the
    # same numbers without computing every branch only to multiply it by 0 (LeNet-5's slots at the
    # budget's ranks: 1.1 s against 3.4 s)
    bare = SelectCompensationPass([])(model).model
    clean_accuracy = accuracy(bare, x, y, batch_size)
    errors = _feature_errors(bare, device, found, x[:FEATURE_ERROR_IMAGES], chips, seed)
    profiles = []
    for candidate in found:
        layer = layers[candidate.layer]
        alone = DeviceConfig([], {layer.node: device.for_layer(layer.node, layer.weight)}, adc_ranges=device.adc_ranges)
        varied = MonteCarloEvaluator(bare, alone, batch_size=batch_size).chip_accuracies(x, y, chips, seed, progress=False,
                                                                                          executor=executor)
        attrs = view.nodes[candidate.layer]
        profiles.append(LayerProfile(candidate.layer, attrs["depth"], attrs["op"], attrs["params"], attrs["macs"] or 0,
                                     norms[candidate.layer], clean_accuracy - float(np.mean(varied)),
                                     errors[candidate.layer], candidate))
    return profiles


def _feature_errors(bare, device, found, x, chips, seed) -> dict[str, float]:
    """Relative L2 error of each candidate layer's output over ``chips`` chips, every layer varied
    (``bare``: the network without its compensation)."""
    probed = onnx.ModelProto.FromString(bare.SerializeToString())
    outputs = {c.layer: next(n.output[0] for n in bare.graph.node if n.name == c.layer) for c in found}
    probed.graph.output.extend(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in outputs.values())
    evaluator = MonteCarloEvaluator(probed, device)
    feed = {evaluator.input_name: x}
    clean = evaluator.clean_session.run(None, feed)[1:]
    errors = np.zeros(len(found))
    for chip in range(chips):
        session, chip_feed = evaluator.chip(seed, chip)
        varied = session.run(None, {**feed, **chip_feed()})[1:]
        errors += [np.linalg.norm(v - c) / max(np.linalg.norm(c), 1e-12) for v, c in zip(varied, clean)]
    return dict(zip(outputs, errors / chips))


# the agent's options at a calibration slot: these fractions of the largest rank the budget left
# still affords there. A fraction keeps its meaning from slot to slot and from model to model, and
# "all of it" at the last slot fills the budget, which fixed rank levels reach by chance only
# (LeNet-5, sigma 0.5: levels 0, 1, 2, 4, 8 left ranks 4/4/0/0/6 out of reach, 98.76% on the
# table's chips against the 98.69% the agent's 4/4/0/0/4 gave)
RANK_FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
VALIDATION_CHIPS_FROM = 1_000_000  # validation chips are chips 1e6.. of the seed: never an evaluated chip


class CalibrationEnv(CompensationEnv):
    """Rewards of rank configurations of ``model``'s calibratable slots under ``device``.

    A configuration is a rank per slot, from 0 (a gain and offset only) to the rank inserted. The
    agent's option ``i`` at a slot is rank ``RANK_FRACTIONS[i] * top`` rounded half up, ``top`` the largest
    rank the budget affords there after the slots before it and the gains and offsets of all.
    A configuration's accuracy is the mean, over ``chips`` validation chips, of each chip's
    accuracy *after* it is calibrated on ``x_calibration`` with that configuration's ranks; its
    overhead counts every slot's digital weights (``slot_weights``). The state is the base
    environment's, the cost feature being that of the slot's largest rank. The validation chips of
    a configuration are independent: ``executor`` runs them (in this process by default, or on Ray
    workers).
    """

    width = len(RANK_FRACTIONS)

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, x_calibration: np.ndarray, x: np.ndarray,
                 y: np.ndarray, *, chips: int = 4, seed: int = 0, overhead_weight: float = 1.0,
                 max_overhead: float = 1.0, batch_size: int = BATCH_SIZE, calibration: CalibrationConfig | None = None,
                 executor: ChipExecutor = IN_PROCESS):
        self.model, self.device, self.x_calibration = model, device, x_calibration
        self.calibration = calibration or CalibrationConfig()
        super().__init__(model, device, x, y, chips=chips, seed=seed, overhead_weight=overhead_weight,
                         max_overhead=max_overhead, batch_size=batch_size, executor=executor)
        layers = {layer.node: layer for layer in analog_layers(model)}
        self.layers = [layers[c.layer] for c in self.candidates]
        self._solves: dict = {}  # every configuration's chips calibrate on the same images: shared solves

    def levels(self, step: int) -> list[int]:
        return list(range(self.candidates[step].rank + 1))

    def choices(self, step: int, chosen: Sequence[int]) -> list[int]:
        spent = sum(slot_weights(layer, rank) for layer, rank in zip(self.layers[:step], chosen[:step]))
        floor = sum(slot_weights(layer, 0) for layer in self.layers[step:])
        layer = self.layers[step]
        left = (self.max_overhead + OVERHEAD_TOLERANCE) * self.analog_weights - spent - floor
        top = max(0, min(self.candidates[step].rank, math.floor(left / weights_per_rank(layer))))
        return [math.floor(fraction * top + 0.5) for fraction in RANK_FRACTIONS]

    def rank_config(self, ranks: Sequence[int]) -> dict[str, int]:
        return {c.layer: int(rank) for c, rank in zip(self.candidates, ranks)}

    def overhead(self, ranks: Sequence[int]) -> float:
        return sum(slot_weights(layer, rank) for layer, rank in zip(self.layers, ranks)) / self.analog_weights

    def _score(self, ranks: tuple[int, ...]) -> tuple[float, float]:
        if ranks not in self._rewards:
            overhead = self.overhead(ranks)
            if overhead > self.max_overhead + OVERHEAD_TOLERANCE:  # not worth calibrating: it may not be kept anyway
                self._rewards[ranks] = (float("nan"), OVER_BUDGET_REWARD)
            else:
                evaluator = CalibratedEvaluator(with_ranks(self.model, self.rank_config(ranks)), self.device,
                                                self.x_calibration, self.calibration, batch_size=self.evaluator.batch_size,
                                                solves=self._solves)
                chips = [VALIDATION_CHIPS_FROM + chip for chip in range(self.chips)]
                mean_accuracy = float(np.mean(self.executor.map_chips(
                    functools.partial(evaluator.chip_accuracy, self.x, self.y, self.seed), chips, progress=False)))
                self._rewards[ranks] = (mean_accuracy, mean_accuracy - self.overhead_weight * overhead)
        return self._rewards[ranks]
