"""Seconds to calibrate one programmed chip: measure its analog layers on 256 images and solve every slot.

Per model, calibration slots are inserted at the largest ranks the 3% budget allows each layer
(``pipeline.calibration_ranks``: an upper bound on what a compiled model carries) with their
projections fitted, and ``--chips`` chips are calibrated one after the other; the table gives the
median and worst wall time of ``Calibrator.calibrate`` (the harness's layer runs and the solves),
and, side by side in the same run, the time to build the simulated chip and to evaluate it once on
the test set, so the calibration cost can be read against what a Monte Carlo sample costs anyway.

    python bench/calibration_speed.py                  # digits, LeNet-5 and the VGG-style net
    python bench/calibration_speed.py --models lenet5-mnist --chips 20
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import onnx
import torch

from rrcompile.calibrate import Calibrator, SimulatedChip, fit_projections
from rrcompile.data import Dataset, Preprocess, fit_to_input, load_data
from rrcompile.devices import DeviceConfig, parse_device
from rrcompile.evaluate import MonteCarloEvaluator, model_io
from rrcompile.io import load_model
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import calibration_ranks, canonicalize
from rrcompile.report import format_table, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MODELS = {  # name: (model, data spec, mean, std)
    "digits": (REPO / "models" / "digits_cnn.onnx", "digits", "0", "1"),
    "lenet5-mnist": (SHARED / "models" / "lenet5_mnist.onnx", f"mnist:{SHARED / 'mnist'}", "0.1307", "0.3081"),
    "vgg-fashion": (REPO / "models" / "vgg_fashion.onnx", f"fashion-mnist:{SHARED / 'fashion-mnist'}", "0", "1"),
}


class Benchmark(NamedTuple):
    model: onnx.ModelProto  # canonical
    x_train: np.ndarray  # the first training images, prepared
    y_train: np.ndarray
    x_test: np.ndarray  # every test image, prepared
    test: Dataset


def load_benchmark(name: str, train_images: int = 2000) -> Benchmark | None:
    """The model and its data (``train_images`` training images), or None when the model or its
    data is missing."""
    path, spec, mean, std = MODELS[name]
    if not path.exists() or (":" in spec and not Path(spec.split(":", 1)[1]).exists()):
        return None
    model = canonicalize(load_model(path))
    input_name, input_shape = model_io(model)
    preprocess = Preprocess.parse("255", mean, std)
    train, test = load_data(spec, "train").subset(train_images), load_data(spec, "test")
    return Benchmark(model, fit_to_input(preprocess.apply(train.x), input_name, input_shape), train.y,
                     fit_to_input(preprocess.apply(test.x), input_name, input_shape), test)


def available_benchmarks(names: list[str], train_images: int = 2000) -> Iterator[tuple[str, Benchmark]]:
    """(name, benchmark) of each of ``names`` whose model and data exist; the others are named as skipped."""
    for name in names:
        loaded = load_benchmark(name, train_images)
        if loaded is None:
            print(f"skipping {name}: {MODELS[name][0]} or its data is missing")
            continue
        yield name, loaded


def slotted_at_budget(model: onnx.ModelProto, device: DeviceConfig, x_train: np.ndarray, budget: float,
                      seed: int) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` with a calibration slot per layer at the largest rank ``budget`` allows it
    (``pipeline.calibration_ranks``: an upper bound on what a compiled model carries), its
    projections fitted on ``x_train``; and those ranks."""
    ranks = calibration_ranks(model, budget)
    slotted = InsertCompensationCandidatesPass(ranks=ranks, calibrated=True)(model).model
    return fit_projections(slotted, device, x_train, seed=seed), ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--device", default="lognormal:sigma=0.5")
    parser.add_argument("--chips", type=int, default=10)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--budget", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "calibration_speed.json"))
    args = parser.parse_args()
    device = parse_device(args.device)
    rows, results = [], {}
    for name, (model, x_train, _, x_test, test) in available_benchmarks(args.models.split(",")):
        slotted, ranks = slotted_at_budget(model, device, x_train, args.budget, args.seed)
        calibrator = Calibrator(slotted)
        evaluator = MonteCarloEvaluator(slotted, device)
        x_calibration = x_train[:args.images]
        build, calibrate, evaluate = [], [], []
        for chip in range(args.chips):
            started = time.perf_counter()
            simulated = SimulatedChip(slotted, device, args.seed, chip, varied=evaluator.varied_model)
            build.append(time.perf_counter() - started)
            started = time.perf_counter()
            calibration = calibrator.calibrate(simulated, x_calibration)
            calibrate.append(time.perf_counter() - started)
            started = time.perf_counter()
            evaluator.chip_accuracy(x_test, test.y, args.seed, chip, calibration.values)
            evaluate.append(time.perf_counter() - started)
        results[name] = {"ranks": ranks, "images": args.images, "chips": args.chips, "calibrate_seconds": calibrate,
                         "simulated_chip_seconds": build, "evaluate_seconds": evaluate, "test_images": len(test.y)}
        rows.append([name, "/".join(map(str, ranks.values())), f"{statistics.median(calibrate):.3f}",
                     f"{max(calibrate):.3f}", f"{statistics.median(build):.3f}",
                     f"{statistics.median(evaluate):.3f} ({len(test.y):,} images)"])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} (threads {torch.get_num_threads()})"
    write_json({"args": vars(args), "machine": machine, "models": results}, args.json)
    print(f"{args.device}, {args.images} calibration images, {args.chips} chips per model; {machine}\n")
    print(format_table(["model", "ranks", "calibrate: median s", "worst s", "simulated chip s", "evaluate once s"],
                       rows, "llrrrr", markdown=True))


if __name__ == "__main__":
    main()
