"""The compiler in one screen. Each stage is a pass from ``rrcompile.passes`` or a training step:

    model = canonicalize(model)                     # one opset, symbolic batch, fused biases, folded BN
    model = finetune(model, Lipschitz penalty)      # error suppression on sampled chips (rrcompile.finetune):
                                                    # trained compensation, or calibration_finetune="raw"
  calibrated compensation (the default), which fine-tunes nothing unless options.calibration_finetune says:
    model = InsertCompensationCandidatesPass(calibrated)  # a calibration slot per analog layer, largest rank
    (model = fit_projections(model, device, x))     # only for projections fixed at compile time
    ranks = Reinforce().select(CalibrationEnv(...)) # RL (or options.strategy) picks each slot's rank, on calibrated chips
    (model = finetune(with_ranks(model, ranks), calibrated on every mini-batch's chip))  # "calibrated" only
  trained compensation (the paper's, ``calibration=False``):
    model = InsertCompensationCandidatesPass(...)   # a gated low-rank digital branch per analog layer
    model = train_compensation(model, device)       # analog weights frozen, a new chip per mini-batch
    keep  = Reinforce().select(CompensationEnv(...))  # RL picks the candidates worth their weights
    model = SelectCompensationPass(keep) + train    # drop the rest, train the kept ones briefly
    chip, report = deploy(model)                    # strip simulation, tag analog/digital, tiles

Each programmed chip is then calibrated (``rrcompile.calibrate``) before it runs.
``simulate(model, device)`` gives the graph with the variation ops in, which ``rrcompile evaluate``
and the Monte Carlo evaluator run.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np
import onnx

from rrcompile.calibrate import (
    CALIBRATION_IMAGES, CalibrationConfig, Calibrator, SimulatedChip, fit_projections, slot_weights, slots, with_ranks,
)
from rrcompile.compensation import weights_per_rank
from rrcompile.compensation_training import CompensationConfig, train_compensation
from rrcompile.crossbar import ADC_IMAGES, needs_adc_ranges, with_adc_ranges
from rrcompile.deploy import deploy
from rrcompile.devices import DeviceConfig
from rrcompile.errors import OptionError, UnsupportedModelError
from rrcompile.executor import IN_PROCESS, ChipExecutor
from rrcompile.finetune import FinetuneConfig, finetune, split_validation
from rrcompile.graph import analog_layers
from rrcompile.hardware import DEFAULT_TILE, HardwareReport
from rrcompile.lipschitz import LipschitzPenalty
from rrcompile.passes.canonicalize import CanonicalizePass
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.select_compensation import SelectCompensationPass
from rrcompile.rl.environment import VALIDATION_CHIPS_FROM, CalibrationEnv, CompensationEnv
from rrcompile.rl.reinforce import EPISODES, Reinforce
from rrcompile.rl.selection import Fixed, GreedyBySensitivity, SearchResult, SelectionStrategy


def canonicalize(model: onnx.ModelProto) -> onnx.ModelProto:
    return CanonicalizePass()(model).model


def simulate(model: onnx.ModelProto, device: DeviceConfig) -> onnx.ModelProto:
    """The canonical model with every analog weight routed through ``device``'s models."""
    return InsertVariationPass(device)(canonicalize(model)).model


# the reward's price of overhead when CompileOptions.overhead_weight is None, per compensation kind:
# calibration slots pay off more (LeNet-5, sigma 0.5: at 0.5 the agent kept 0.97% overhead for 98.32%
# on its calibrated validation chips, where 2.98% gave 98.64%)
OVERHEAD_WEIGHT = {"calibrated": 0.1, "trained": 0.5}
CALIBRATION_FINETUNES = ("none", "calibrated", "raw")  # CompileOptions.calibration_finetune


@dataclasses.dataclass
class CompileOptions:
    device: DeviceConfig
    lipschitz: bool = True  # switches, for ablations: the fine-tune's penalty,
    noise_injection: bool = True  # its training on sampled chips (no fine-tune when both are off),
    compensation: bool = True  # compensation and its selection,
    rl: bool = True  # and RL (False: ranks greedily by sensitivity, or keeps every trained candidate)
    calibration: bool = True  # calibratable compensation, solved per chip (False: trained, the paper's)
    calibration_images: int = CALIBRATION_IMAGES  # unlabeled images each chip is calibrated on
    # what a calibrated compile fine-tunes (with the penalty and the sampled chips the two switches
    # above ask for): "none", nothing: calibration repairs the network as given; "calibrated",
    # after the ranks are chosen, each mini-batch's chip calibrated in the forward pass; "raw",
    # first, on raw chips, as without calibration. "none" by measurement: the calibrated fine-tune
    # kept the given network (its epoch 0) in all 7 cells bench/paper_table.py ran at d02f697, and
    # took 60-75% of LeNet-5's compile; a network fine-tuned on raw chips calibrates worse (noise
    # injection + calibrated, LeNet-5 at sigma 0.5: 98.63% against 98.69%; VGG-style at 0.7: 83.16%
    # against 89.07%)
    calibration_finetune: str = "none"
    calibration_config: CalibrationConfig = dataclasses.field(default_factory=CalibrationConfig)
    # the trainings' own knobs (epochs, lr, batch size, ...); the fields compile derives from the
    # options here (see finetune_config, compensation_config) are left at their defaults or agree
    finetune: FinetuneConfig = dataclasses.field(default_factory=FinetuneConfig)
    beta: float = 0.01
    lipschitz_form: str = "spectral"
    budget: float = 0.03  # sets each candidate's rank (per layer) and caps the kept ones' total, both
    # as a fraction of analog weights
    train: CompensationConfig = dataclasses.field(default_factory=CompensationConfig)
    final_epochs: int = 1  # the kept compensation's training: ``train`` with these epochs
    episodes: int = EPISODES
    strategy: SelectionStrategy | None = None  # the agent when rl is on; None: Reinforce(episodes, seed)
    # reward = accuracy - overhead_weight * overhead fraction; None: OVERHEAD_WEIGHT of the compensation kind
    overhead_weight: float | None = None
    rl_chips: int = 8
    rl_images: int = 2000
    tile: int = DEFAULT_TILE
    seed: int = 0
    # where torch trains and where a chip's calibration is timed: cpu, cuda, or auto (CUDA when
    # torch sees a GPU); the agent's and the fine-tune's validation chips stay on onnxruntime's
    # CPU path, so what compile chooses does not depend on the machine
    device_type: str = "auto"


@dataclasses.dataclass
class CompileResult:
    model: onnx.ModelProto  # compiled, before deploy (the simulation graph's base)
    deployed: onnx.ModelProto
    hardware: HardwareReport
    seconds: dict[str, float]  # per stage
    selection: dict[str, SearchResult]  # none / all / greedy / rl, scored on the validation chips
    kept: list[str]
    ranks: dict[str, int] = dataclasses.field(default_factory=dict)  # calibration slots: layer -> rank
    x_calibration: np.ndarray | None = None  # the images the compiler calibrated its validation chips on
    # compile changed no weight of the network: nothing was fine-tuned and nothing trained is added
    # (calibration slots are identities until a chip is calibrated), so chip k of the compiled
    # model, uncalibrated, computes what chip k of the original does (the report measures it once)
    network_as_given: bool = False


def calibration_ranks(model: onnx.ModelProto, budget: float, projection: str = "chip") -> dict[str, int]:
    """The largest rank each layer's slot could take alone within ``budget``, every slot's gain
    and offset paid first: the ranks the agent chooses up to. A correction of a
    layer has rank ``min(rows, cols)`` at most; with a per-chip projection, weights past that rank
    buy nothing (a compiled projection may still use more directions than columns to choose from)."""
    layers = analog_layers(model)
    total = sum(layer.params for layer in layers)
    floor = sum(slot_weights(layer, 0) for layer in layers)
    if floor > budget * total:
        raise OptionError(f"--budget {budget:g}: calibration needs at least {floor / total:.2%} of the analog weights "
                          f"(a gain and an offset per column of every layer); raise the budget or use "
                          f"--trained-compensation")
    left = budget * total - floor
    useful = {layer.node: min(layer.rows, layer.cols) if projection == "chip" else layer.rows for layer in layers}
    return {layer.node: min(useful[layer.node], math.floor(left / weights_per_rank(layer))) for layer in layers}


def _derived(config, derived: dict[str, tuple[object, str]]):
    """``config`` with the fields compile derives from its options: ``derived`` maps a field to its
    value and the CompileOptions fields it comes from. A field the caller set (away from its class
    default) to another value is refused, naming where to set it: a caller's value is never
    replaced silently."""
    defaults = type(config)()
    for name, (value, source) in derived.items():
        given = getattr(config, name)
        if given != getattr(defaults, name) and given != value:
            raise OptionError(f"{type(config).__name__}.{name}={given!r} conflicts with compile's {value!r}, "
                              f"which it derives from CompileOptions.{source}: set it there, or leave {name} at "
                              f"its default")
    return dataclasses.replace(config, **{name: value for name, (value, _) in derived.items()})


def finetune_config(options: CompileOptions) -> FinetuneConfig:
    """The fine-tune's configuration: ``options.finetune`` with what the options decide filled in."""
    calibrating = options.compensation and options.calibration
    return _derived(options.finetune, {
        "seed": (options.seed, "seed"),
        "validation_device": (options.device, "device"),
        "lipschitz": (LipschitzPenalty(options.beta, options.lipschitz_form) if options.lipschitz else None,
                      "lipschitz, beta and lipschitz_form"),
        "noise_injection": (options.device if options.noise_injection else None, "noise_injection and device"),
        "calibration": (options.calibration_config
                        if calibrating and options.noise_injection and options.calibration_finetune == "calibrated"
                        else None,
                        "calibration_config (when calibrating with noise_injection and calibration_finetune calibrated)"),
        "calibration_images": (options.calibration_images, "calibration_images"),
        "device_type": (options.device_type, "device_type"),
    })


def compensation_config(options: CompileOptions) -> CompensationConfig:
    """The trained compensation's configuration: ``options.train`` with what the options decide filled in."""
    derived: dict[str, tuple[object, str]] = {"seed": (options.seed, "seed"),
                                              "device_type": (options.device_type, "device_type")}
    if options.noise_injection:
        # a network fine-tuned on sampled chips expects varied feature maps downstream: pulling them
        # toward the clean ones then costs accuracy (LeNet-5, sigma 0.5: 95.7% with the term off,
        # 95.0% at weight 0.1, 93.9% at 1, over 8 validation chips), so the task loss trains alone
        derived["feature_weight"] = (0.0, "noise_injection")
    return _derived(options.train, derived)


def _overhead_weight(options: CompileOptions, kind: str) -> float:
    return OVERHEAD_WEIGHT[kind] if options.overhead_weight is None else options.overhead_weight


def _agent(options: CompileOptions, otherwise: SelectionStrategy, progress: bool) -> tuple[str, SelectionStrategy]:
    """(its row in the selection table, the strategy that chooses): ``otherwise`` without RL."""
    if not options.rl:
        return "chosen", otherwise
    if options.strategy is not None:
        return options.strategy.name, options.strategy
    return Reinforce.name, Reinforce(options.episodes, options.seed, progress=progress)


def _seconds_to_calibrate(model: onnx.ModelProto, options: CompileOptions, x_calibration: np.ndarray) -> float:
    """Wall seconds to measure and solve one chip (a validation chip) on this machine."""
    calibrator = Calibrator(model, options.calibration_config, device_type=options.device_type)
    chip = SimulatedChip(model, options.device, options.seed, VALIDATION_CHIPS_FROM)
    started = time.perf_counter()
    calibrator.calibrate(chip, x_calibration)
    return time.perf_counter() - started


def _calibration_slots(model, x, y, options: CompileOptions, stage, progress: bool, executor: ChipExecutor):
    """(model with a calibration slot per layer at the agent's ranks, selection, ranks, calibration images)."""
    x_train, _, x_val, y_val = split_validation(x, y, options.finetune.val_fraction, options.seed)
    # the first images of the training data, as `rrcompile evaluate --calibrate` and `calibrate` take them
    x_calibration = x[:options.calibration_images]
    model = stage("insert calibration slots", lambda: InsertCompensationCandidatesPass(
        ranks=calibration_ranks(model, options.budget, options.calibration_config.projection), calibrated=True, seed=options.seed)(model).model)
    if not slots(model):
        raise UnsupportedModelError("no analog layer could take a calibration slot (see the warnings); "
                                    "compile with --no-compensation")
    if options.calibration_config.projection == "compiled":  # else every chip solves its own
        model = stage("fit projections", lambda: fit_projections(model, options.device, x_train[:2000], seed=options.seed))
    env = stage("profile layers", lambda: CalibrationEnv(
        model, options.device, x_calibration, x_val[:options.rl_images], y_val[:options.rl_images],
        chips=options.rl_chips, seed=options.seed, overhead_weight=_overhead_weight(options, "calibrated"),
        max_overhead=options.budget, calibration=options.calibration_config, executor=executor))
    label, agent = _agent(options, GreedyBySensitivity(), progress)
    choice = stage("RL selection", lambda: agent.select(env, options.budget))
    selection = {"none": Fixed(keep_all=False).select(env, options.budget),
                 "greedy": GreedyBySensitivity().select(env, options.budget), label: choice}
    ranks = env.rank_config(choice.values)
    return with_ranks(model, ranks), selection, ranks, x_calibration


def _trained_compensation(model, x, y, options: CompileOptions, train: CompensationConfig, stage, progress: bool,
                          executor: ChipExecutor):
    """(model with the kept trained compensation, selection, kept layers): the paper's method."""
    x_train, y_train, x_val, y_val = split_validation(x, y, options.finetune.val_fraction, options.seed)
    model = stage("insert candidates", lambda: InsertCompensationCandidatesPass(options.budget, seed=options.seed)(model).model)
    model = stage("train compensation", lambda: train_compensation(model, options.device, x_train, y_train, train, progress=progress)[0])
    env = stage("profile layers", lambda: CompensationEnv(
        model, options.device, x_val[:options.rl_images], y_val[:options.rl_images], chips=options.rl_chips,
        seed=options.seed, overhead_weight=_overhead_weight(options, "trained"), max_overhead=options.budget,
        executor=executor))
    label, agent = _agent(options, Fixed(keep_all=True), progress)
    choice = stage("RL selection", lambda: agent.select(env, options.budget))
    # greedy at the chosen overhead: what sensitivity alone buys for the same digital weights
    selection = {"none": Fixed(keep_all=False).select(env, options.budget),
                 "all": Fixed(keep_all=True).select(env, options.budget),
                 "greedy": GreedyBySensitivity().select(env, choice.overhead), label: choice}
    kept = choice.kept_layers
    final = dataclasses.replace(train, epochs=options.final_epochs)
    model = stage("final training", lambda: train_compensation(
        SelectCompensationPass(kept)(model).model, options.device, x_train, y_train, final, progress=progress)[0])
    return model, selection, kept


def compile(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, options: CompileOptions, *,
            progress: bool = True, log: Callable[[str], None] = print, executor: ChipExecutor = IN_PROCESS,
            ) -> CompileResult:
    """Compile ``model`` for ``options.device`` with training data ``x`` (prepared), ``y``; ``executor``
    runs the chips of the agent's layer profiles and its calibrated validation chips."""
    if options.calibration_finetune not in CALIBRATION_FINETUNES:
        raise OptionError(f"calibration fine-tune {options.calibration_finetune!r}: expected one of "
                          f"{', '.join(CALIBRATION_FINETUNES)}")
    config, train = finetune_config(options), compensation_config(options)  # a conflict is refused before any work
    seconds: dict[str, float] = {}

    def stage(name: str, run: Callable[[], object]):
        log(f"[{len(seconds) + 1}] {name} ...")
        started = time.perf_counter()
        result = run()
        seconds[name] = time.perf_counter() - started
        log(f"    {name}: done in {seconds[name]:.1f} s")
        return result

    model = stage("canonicalize", lambda: canonicalize(model))
    if needs_adc_ranges(options.device):
        # fixed once, on the network as given: every later stage (fine-tune, selection,
        # calibration) simulates these converters, and the deployed graph stores them
        options = dataclasses.replace(options, device=with_adc_ranges(model, options.device, x[:ADC_IMAGES]))
        config = finetune_config(options)
    calibrating = options.compensation and options.calibration
    fine_tune = (options.lipschitz or options.noise_injection) and not (calibrating and options.calibration_finetune == "none")
    if fine_tune and config.calibration is None:
        model = stage("fine-tune", lambda: finetune(model, x, y, config, progress=progress).model)
    selection, kept, ranks, x_calibration, calibration_seconds = {}, [], {}, None, None
    if calibrating:
        model, selection, ranks, x_calibration = _calibration_slots(model, x, y, options, stage, progress, executor)
        kept = [layer for layer, rank in ranks.items() if rank]
        if fine_tune and config.calibration is not None:
            model = stage("fine-tune for calibration", lambda: finetune(model, x, y, config, progress=progress).model)
        calibration_seconds = _seconds_to_calibrate(model, options, x_calibration)
    elif options.compensation:
        model, selection, kept = _trained_compensation(model, x, y, options, train, stage, progress, executor)
    deployed, hardware = stage("deploy", lambda: deploy(
        model, options.tile, device=options.device, calibration_images=len(x_calibration) if calibrating else None,
        calibration_seconds=calibration_seconds))
    trained_compensation = options.compensation and not calibrating
    return CompileResult(model, deployed, hardware, seconds, selection, kept, ranks, x_calibration,
                         network_as_given=not fine_tune and not trained_compensation)
