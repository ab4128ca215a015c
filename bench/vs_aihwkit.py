"""rrcompile against IBM's aihwkit on LeNet-5 / MNIST: Monte Carlo speed, and hardware-aware training.

1. The same chips in both simulators. LeNet-5 (``../shared/data/models/lenet5_mnist.onnx``) under
   log-normal variation: rrcompile's ``MonteCarloEvaluator``, and aihwkit on the same network
   (``TorchGraph(layer_modules=True)`` through ``convert_to_analog``) with a noise model that
   multiplies every programmed conductance by ``exp(theta)`` and ideal periphery (no ADC/DAC, no
   read noise), so both simulate ``w * exp(theta)`` and their accuracies must agree within
   sampling error. A chip is one programming of every weight, over the whole test set. Both are
   timed interleaved in one run (``--rounds``) and reported as images x chips per second, aihwkit
   with each of its inference tiles (``InferenceRPUConfig``, the C++ simulator, and
   ``TorchInferenceRPUConfig``); the ratio printed last is against the faster of the two.
   aihwkit's own PCM noise model (``PCMLikeNoiseModel``, 1 hour after programming, its default
   periphery) is evaluated too, for reference, and so is the crossbar as built (issue 12): the same
   128-row tiles and ``--adc-bits`` ADCs in both (:func:`crossbar_periphery` says how aihwkit is
   configured and where the two differ: each sets its ADC ranges its own way).
2. Hardware-aware training at the same epochs, from the same pretrained weights, each result
   evaluated by rrcompile on the same ``--samples`` chips of the device: aihwkit's HWA training
   (``TorchInferenceRPUConfig`` with multiplicative Gaussian weight noise of the device's standard
   deviation on every forward pass, Adam through ``AnalogOptimizer``), rrcompile's noise injection,
   and ``rrcompile compile``.

aihwkit is optional (``bench/README.md`` says how to build it); without it the script says so and
exits with code 2. The ratio of Monte Carlo throughputs is printed last.

    python bench/vs_aihwkit.py [--sigma 0.5] [--chips 20] [--rounds 2] [--epochs 5] [--samples 100]
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rrcompile.crossbar import ADC_IMAGES, with_adc_ranges
from rrcompile.data import Preprocess, batches, fit_to_input, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator, model_io
from rrcompile.finetune import FinetuneConfig, finetune, logits_model, split_validation
from rrcompile.io import load_model
from rrcompile.pipeline import CompileOptions, canonicalize, compile
from rrcompile.report import format_table, percent, write_json
from rrcompile.torch_graph import TorchGraph, write_back

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODEL = SHARED / "models" / "lenet5_mnist.onnx"
MNIST = SHARED / "mnist"
PREPROCESS = Preprocess.parse("255", "0.1307", "0.3081")
TILE = 128  # crossbar rows and columns in the tiles-and-ADCs row

try:
    from aihwkit.inference import PCMLikeNoiseModel
    from aihwkit.inference.noise.base import BaseNoiseModel
    from aihwkit.nn.conversion import convert_to_analog
    from aihwkit.optim import AnalogOptimizer
    from aihwkit.simulator.configs import InferenceRPUConfig, TorchInferenceRPUConfig
    from aihwkit.simulator.parameters import BoundManagementType, IOParameters, WeightModifierType
except ImportError as error:
    AIHWKIT_MISSING = f"aihwkit is not installed ({error}); see bench/README.md for how to build it"
else:
    AIHWKIT_MISSING = None

    class LogNormalNoiseModel(BaseNoiseModel):
        """Programming multiplies each conductance by exp(theta), theta ~ N(0, sigma^2); no drift."""

        def __init__(self, sigma: float):
            super().__init__()
            self.sigma = sigma

        @torch.no_grad()
        def apply_programming_noise_to_conductance(self, g_target: torch.Tensor) -> torch.Tensor:
            return g_target * torch.exp(self.sigma * torch.randn_like(g_target))

        @torch.no_grad()
        def apply_drift_noise_to_conductance(self, g_prog, drift_noise_param, t_inference: float) -> torch.Tensor:
            return g_prog


@dataclasses.dataclass
class Timed:
    accuracies: list[float]
    seconds: float


def ideal_periphery(rpu_config):
    """``rpu_config`` with an ideal forward pass and no weight clipping: only the noise model acts."""
    rpu_config.forward = IOParameters(is_perfect=True)
    rpu_config.drift_compensation = None
    rpu_config.clip.type = type(rpu_config.clip.type).NONE
    return rpu_config


def crossbar_periphery(rpu_config, bits: int, tile: int = TILE):
    """``rpu_config`` on arrays of ``tile`` rows and columns with ``bits``-bit ADCs, the periphery
    otherwise ideal: ``mapping.max_input_size`` splits each layer's inputs over tiles whose outputs
    aihwkit sums digitally, as rrcompile's ``tile`` term does; ``out_res = 1 / (2^bits - 2)`` of the
    output range ``[-out_bound, out_bound]`` gives the ``2^bits - 1`` levels of rrcompile's ``adc``
    term; no DAC quantization (``inp_res=-1``), no output or weight noise, no bound management, no
    weight clipping. The ranges differ by design: aihwkit's is its default ``out_bound`` in units of
    the tile's normalized weights and inputs (noise management scales each input vector by its
    largest entry), rrcompile's the largest clean partial sum of each tile and column on 256
    training images."""
    rpu_config.mapping.max_input_size = tile
    rpu_config.mapping.max_output_size = tile
    rpu_config.forward = IOParameters(inp_res=-1, out_res=1 / (2 ** bits - 2), out_noise=0.0, w_noise=0.0,
                                      bound_management=BoundManagementType.NONE)
    rpu_config.drift_compensation = None
    rpu_config.clip.type = type(rpu_config.clip.type).NONE
    return rpu_config


def analog_lenet(model, rpu_config) -> torch.nn.Module:
    module = TorchGraph(logits_model(model), layer_modules=True).eval()
    return convert_to_analog(module, rpu_config).eval()


def aihwkit_chips(analog: torch.nn.Module, x: np.ndarray, y: np.ndarray, chips: range, seed: int,
                  t_inference: float = 0.0, batch: int = 500) -> Timed:
    accuracies = []
    started = time.perf_counter()
    with torch.no_grad():
        for chip in chips:
            torch.manual_seed(seed * 100_003 + chip)
            analog.program_analog_weights()
            if t_inference:
                analog.drift_analog_weights(t_inference)
            correct = sum(int((analog(torch.from_numpy(xb)).argmax(1).numpy() == yb).sum())
                          for xb, yb in batches(x, y, batch))
            accuracies.append(correct / len(y))
    return Timed(accuracies, time.perf_counter() - started)


def rrcompile_chips(evaluator: MonteCarloEvaluator, x, y, chips: range, seed: int) -> Timed:
    started = time.perf_counter()
    accuracies = [evaluator.chip_accuracy(x, y, seed, chip) for chip in chips]
    return Timed(accuracies, time.perf_counter() - started)


def hwa_train(model, x: np.ndarray, y: np.ndarray, weight_std: float, epochs: int, seed: int):
    """aihwkit hardware-aware training; returns ``model`` with the trained weights written back."""
    torch.manual_seed(seed)
    rpu_config = TorchInferenceRPUConfig()
    rpu_config.modifier.type = WeightModifierType.MULT_NORMAL
    rpu_config.modifier.std_dev = weight_std
    rpu_config.modifier.rel_to_actual_wmax = False
    plain = TorchGraph(logits_model(model), layer_modules=True)
    analog = convert_to_analog(plain, ideal_periphery(rpu_config))
    optimizer = AnalogOptimizer(torch.optim.Adam, analog.parameters(), lr=1e-3)
    x_train, y_train, _, _ = split_validation(x, y, 0.1, seed)  # the data rrcompile's fine-tune trains on
    rng = np.random.default_rng([seed, 0xB47])
    for epoch in range(epochs):
        analog.train()
        order = rng.permutation(len(y_train))
        for start in range(0, len(order), 128):
            index = order[start:start + 128]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(analog(torch.from_numpy(x_train[index])),
                                                     torch.from_numpy(y_train[index]).long())
            loss.backward()
            optimizer.step()
        print(f"  aihwkit HWA epoch {epoch + 1}/{epochs}: last loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        for key, layer in analog.layers.items():
            weight, bias = layer.get_weights()
            plain.layers[key].weight.copy_(weight.reshape(plain.layers[key].weight.shape))
            if bias is not None:
                plain.layers[key].bias.copy_(bias)
    return write_back(plain, model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--chips", type=int, default=20, help="chips per simulator and round in the timing")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds")
    parser.add_argument("--epochs", type=int, default=5, help="hardware-aware training epochs, every method")
    parser.add_argument("--samples", type=int, default=100, help="chips for the training comparison")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adc-bits", type=int, default=8, help="ADC resolution of the tiles-and-ADCs row")
    parser.add_argument("--skip-training", action="store_true", help="only the Monte Carlo comparison")
    parser.add_argument("--json", default=str(REPO / "build" / "vs_aihwkit.json"))
    args = parser.parse_args()
    if AIHWKIT_MISSING:
        print(AIHWKIT_MISSING, file=sys.stderr)
        sys.exit(2)
    if not MODEL.exists() or not MNIST.exists():
        print(f"needs {MODEL} and {MNIST} (../shared/data)", file=sys.stderr)
        sys.exit(2)

    model = canonicalize(load_model(MODEL))
    input_name, input_shape = model_io(model)
    test, train = load_data(f"mnist:{MNIST}", "test"), load_data(f"mnist:{MNIST}", "train")
    x_test = fit_to_input(PREPROCESS.apply(test.x), input_name, input_shape)
    x_train = fit_to_input(PREPROCESS.apply(train.x), input_name, input_shape)
    device = parse_device(f"lognormal:sigma={args.sigma:g}")
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"LeNet-5 on the {len(test.y)} MNIST test images, log-normal sigma {args.sigma:g}; {machine}", flush=True)

    # 1. Monte Carlo throughput, the same device in both, interleaved rounds
    evaluator = MonteCarloEvaluator(model, device)

    def aihwkit_simulator(rpu_config):
        analog = analog_lenet(model, ideal_periphery(rpu_config))
        return lambda chips: aihwkit_chips(analog, x_test, test.y, chips, args.seed)

    simulators = {
        "rrcompile": lambda chips: rrcompile_chips(evaluator, x_test, test.y, chips, args.seed),
        "aihwkit (InferenceRPUConfig)": aihwkit_simulator(InferenceRPUConfig(noise_model=LogNormalNoiseModel(args.sigma))),
        "aihwkit (TorchInferenceRPUConfig)": aihwkit_simulator(
            TorchInferenceRPUConfig(noise_model=LogNormalNoiseModel(args.sigma))),
    }
    runs: dict[str, list[Timed]] = {name: [] for name in simulators}
    for round_ in range(args.rounds):
        chips = range(round_ * args.chips, (round_ + 1) * args.chips)
        for name, run in simulators.items():
            runs[name].append(run(chips))
            print(f"  round {round_ + 1}: {name} {args.chips} chips in {runs[name][-1].seconds:.1f} s", flush=True)
    pcm = aihwkit_chips(analog_lenet(model, TorchInferenceRPUConfig(noise_model=PCMLikeNoiseModel())), x_test, test.y,
                        range(args.chips), args.seed, t_inference=3600.0)
    # the crossbar as built, in both: the same tiles and ADC resolution (not part of the timing)
    crossbar = with_adc_ranges(model, parse_device(f"tile:size={TILE}+adc:bits={args.adc_bits}+lognormal:sigma={args.sigma:g}"),
                               x_train[:ADC_IMAGES])
    tiled = {
        f"rrcompile, {TILE}-row tiles, {args.adc_bits}-bit ADCs": rrcompile_chips(
            MonteCarloEvaluator(model, crossbar), x_test, test.y, range(args.chips), args.seed),
        f"aihwkit (TorchInferenceRPUConfig), {TILE}-row tiles, {args.adc_bits}-bit ADCs": aihwkit_chips(
            analog_lenet(model, crossbar_periphery(TorchInferenceRPUConfig(noise_model=LogNormalNoiseModel(args.sigma)),
                                                   args.adc_bits)), x_test, test.y, range(args.chips), args.seed),
    }

    def throughput(timed: list[Timed]) -> float:
        return sum(len(r.accuracies) for r in timed) * len(test.y) / sum(r.seconds for r in timed)

    rows, report = [], {"machine": machine, "args": vars(args), "monte_carlo": {}, "training": {}}
    for name, timed in [*runs.items(), ("aihwkit PCMLikeNoiseModel, t = 1 h", [pcm]),
                        *((name, [timed]) for name, timed in tiled.items())]:
        accuracies = [a for r in timed for a in r.accuracies]
        speed = throughput(timed)
        rows.append([name, len(accuracies), percent(float(np.mean(accuracies))), percent(float(np.std(accuracies))),
                     percent(float(np.min(accuracies))), f"{speed:,.0f}"])
        report["monte_carlo"][name] = {"chips": len(accuracies), "mean": float(np.mean(accuracies)),
                                       "std": float(np.std(accuracies)), "images_x_chips_per_second": speed}
    print(f"\nMonte Carlo evaluation, lognormal:sigma={args.sigma:g} unless named (accuracy over chips):\n")
    print(format_table(["simulator", "chips", "mean", "std", "worst", "images x chips / s"], rows, markdown=True))

    # 2. hardware-aware training at the same epochs, every result on the same chips
    if not args.skip_training:
        weight_std = math.sqrt((math.exp(args.sigma ** 2) - 1) * math.exp(args.sigma ** 2))  # std of exp(theta)
        trained, seconds = {}, {}
        for name, train_one in [
            ("aihwkit HWA training", lambda: hwa_train(model, x_train, train.y, weight_std, args.epochs, args.seed)),
            ("rrcompile noise injection", lambda: finetune(model, x_train, train.y, FinetuneConfig(
                epochs=args.epochs, seed=args.seed, noise_injection=device, validation_device=device), progress=False).model),
            ("rrcompile compile", lambda: compile(model, x_train, train.y, CompileOptions(
                device, finetune=FinetuneConfig(epochs=args.epochs), budget=0.03, seed=args.seed),
                progress=False, log=lambda _: None).model),
        ]:
            started = time.perf_counter()
            trained[name] = train_one()
            seconds[name] = time.perf_counter() - started
            print(f"  {name}: trained in {seconds[name]:.0f} s", flush=True)
        rows = []
        for name, tuned in [("original", model), *trained.items()]:
            stats = MonteCarloEvaluator(tuned, device).evaluate(x_test, test.y, args.samples, args.seed, progress=False)
            rows.append([name, percent(stats.clean_accuracy), percent(stats.mean), percent(stats.p5),
                         percent(stats.worst), percent(stats.yield_), f"{seconds.get(name, 0):.0f} s"])
            report["training"][name] = {**stats.summary(), "seconds": seconds.get(name, 0.0)}
        print(f"\n{args.epochs} training epochs each; every model on the same {args.samples} chips of "
              f"lognormal:sigma={args.sigma:g}, full test set:\n")
        print(format_table(["method", "clean", "mean", "5th pct", "worst", "yield", "training"], rows, markdown=True))

    ratio = throughput(runs["rrcompile"]) / max(throughput(timed) for name, timed in runs.items() if name != "rrcompile")
    report["throughput_ratio"] = ratio
    write_json(report, args.json)
    print(f"\nMonte Carlo throughput, rrcompile / the faster aihwkit tile, timed interleaved: {ratio:.1f}x")


if __name__ == "__main__":
    main()
