"""The GPU against the CPU of the same machine, side by side in one run (issue 13, part 2).

Per model (LeNet-5 on MNIST, the VGG-style net on Fashion-MNIST; ``lognormal:sigma=0.5``), each
stage runs with ``device_type="cpu"`` and then with ``"cuda"``, on the same chips and images:

1. Monte Carlo: seconds per chip over the whole test set. The CPU path is onnxruntime; on CUDA it
   is onnxruntime's CUDA provider where this onnxruntime has it, else rrcompile's torch executor
   (the JSON says which). The per-chip accuracies of both paths are compared chip for chip, and
   chip 0's outputs on the first 16 test images (largest difference over the largest output).
2. Calibration: seconds to measure and calibrate one chip on 256 images, slots at the largest
   ranks the 3% budget allows each layer (as ``bench/calibration_speed.py``).
3. Fine-tune: seconds for one epoch of noise-injection fine-tuning on ``--train-images`` images,
   the whole ``finetune`` call (its validation chips stay on onnxruntime's CPU path by design).

``--models`` may also name ``bench/scaling.py``'s ResNets (``resnet20-cifar``,
``resnet50-imagenet``: written there, random weights): for them only Monte Carlo is measured, on
``--synthetic-images`` random images, since only the time matters and a GPU is where an
ImageNet-size model's chips belong. Their labels are the clean network's own top-1 classes (on
onnxruntime), so a chip's accuracy is its agreement with the clean network, and comparing it
across paths means something (random labels would give 0% on every chip).

The first chip of each path is a warm-up (CUDA context, kernel choice) and is not timed.
Writes ``gpu.json`` to ``--out`` and prints the table, Markdown. Without a GPU it says so and
exits 2, unless ``--device-types cpu`` (to check the script on a machine without one).

    python bench/gpu.py --out build/gpu
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from calibration_speed import available_benchmarks, slotted_at_budget  # noqa: E402
import scaling  # noqa: E402

from rrcompile.calibrate import Calibrator, SimulatedChip  # noqa: E402
from rrcompile.devices import parse_device  # noqa: E402
from rrcompile.evaluate import MonteCarloEvaluator  # noqa: E402
from rrcompile.finetune import FinetuneConfig, finetune  # noqa: E402
from rrcompile.report import format_table, write_json  # noqa: E402

BUDGET = 0.03
CALIBRATION_IMAGES = 256
PROJECTION_IMAGES = 2000  # the training images the slots' compile-time projections are fitted on
OUTPUT_IMAGES = 16  # chip 0's outputs on these first test images are compared across paths too


def _timed(call) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = call()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, result


def monte_carlo(model, device, x, y, chips: int, device_type: str, batch_size: int) -> dict:
    evaluator = MonteCarloEvaluator(model, device, batch_size=batch_size, device_type=device_type)
    evaluator.chip_accuracy(x, y, 0, chips)  # warm-up on a chip outside the timed ones
    seconds, accuracies = [], []
    for chip in range(chips):
        spent, accuracy = _timed(lambda: evaluator.chip_accuracy(x, y, 0, chip))
        seconds.append(spent)
        accuracies.append(accuracy)
    session, _ = evaluator.chip(0, 0)
    logits = session.run(None, {evaluator.input_name: x[:OUTPUT_IMAGES]})[0]
    return {"seconds_per_chip": statistics.median(seconds), "accuracies": accuracies,
            "first_chip_logits": logits, "session": type(evaluator.clean_session).__name__}


def calibration(slotted, device, x_calibration, chips: int, device_type: str) -> dict:
    calibrator = Calibrator(slotted, device_type=device_type)
    evaluator = MonteCarloEvaluator(slotted, device)  # the chips' draws; inference is not timed here
    calibrator.calibrate(SimulatedChip(slotted, device, 0, chips, varied=evaluator.varied_model), x_calibration)
    seconds = []
    for chip in range(chips):
        simulated = SimulatedChip(slotted, device, 0, chip, varied=evaluator.varied_model)
        seconds.append(_timed(lambda: calibrator.calibrate(simulated, x_calibration))[0])
    return {"seconds_per_chip": statistics.median(seconds)}


def finetune_epoch(model, device, x, y, device_type: str) -> dict:
    config = FinetuneConfig(epochs=1, noise_injection=device, validation_device=device, device_type=device_type)
    seconds, result = _timed(lambda: finetune(model, x, y, config, progress=False))
    return {"seconds": seconds, "clean_val": result.history[-1].clean_val}


def _rows(name: str, per_type: dict) -> list[list[str]]:
    """The table's rows of one model: a row per device type, compared with the first type's. Each
    type's chip-0 outputs are replaced by their difference from the first's (relative to its
    largest output): the outputs themselves are too many to keep."""
    first, rows = next(iter(per_type.values())), []
    reference = first["monte_carlo"]["first_chip_logits"]
    for measured in per_type.values():
        outputs = measured["monte_carlo"].pop("first_chip_logits")
        measured["monte_carlo"]["first_chip_output_diff"] = float(np.abs(outputs - reference).max() / np.abs(reference).max())
    for device_type, measured in per_type.items():
        difference = max(abs(a - b) for a, b in zip(measured["monte_carlo"]["accuracies"],
                                                     first["monte_carlo"]["accuracies"]))
        rows.append([name, device_type, measured["monte_carlo"]["session"],
                     f"{measured['monte_carlo']['seconds_per_chip']:.3f}", f"{difference * 100:.2f}",
                     f"{measured['monte_carlo']['first_chip_output_diff']:.1e}",
                     f"{measured['calibration']['seconds_per_chip']:.3f}" if "calibration" in measured else "-",
                     f"{measured['finetune_epoch']['seconds']:.1f}" if "finetune_epoch" in measured else "-"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lenet5-mnist,vgg-fashion")
    parser.add_argument("--device", default="lognormal:sigma=0.5")
    parser.add_argument("--device-types", default="cpu,cuda")
    parser.add_argument("--chips", type=int, default=5, help="timed chips per stage and path")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=500, help="Monte Carlo inference batch")
    parser.add_argument("--synthetic-images", type=int, default=256,
                        help="random images per chip for the ResNets of bench/scaling.py")
    parser.add_argument("--out", default=str(REPO / "build" / "gpu"))
    args = parser.parse_args()
    device_types = args.device_types.split(",")
    if "cuda" in device_types and not torch.cuda.is_available():
        print("bench/gpu.py: torch sees no CUDA GPU here (use --device-types cpu to check the script)", file=sys.stderr)
        return 2
    device = parse_device(args.device)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    machine = (f"{platform.machine()}, {os.cpu_count()} CPU cores, GPU {gpu}; torch {torch.__version__}, "
               f"onnxruntime {ort.__version__} (providers {', '.join(ort.get_available_providers())})")
    print(machine, flush=True)
    results, rows = {}, []
    names = args.models.split(",")
    synthetic = [name for name in names if "file" not in scaling.MODELS.get(name, {"file": None})]
    for name in synthetic:
        model, x_test, _, _, _ = scaling.model_and_data(name, args.synthetic_images, 0)
        clean = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        y_test = np.concatenate([clean.run(None, {clean.get_inputs()[0].name: x_test[start:start + args.batch_size]})[0]
                                 .argmax(axis=1) for start in range(0, len(x_test), args.batch_size)])
        per_type = {}
        for device_type in device_types:
            print(f"{name}, {device_type} ...", flush=True)
            per_type[device_type] = {"monte_carlo": monte_carlo(model, device, x_test, y_test, args.chips, device_type,
                                                                args.batch_size)}
        results[name] = per_type
        rows += _rows(name, per_type)
    for name, (model, x_train, y_train, x_test, test) in available_benchmarks(
            [name for name in names if name not in synthetic], args.train_images):
        x_few = x_train[:PROJECTION_IMAGES]
        slotted, _ = slotted_at_budget(model, device, x_few, BUDGET, seed=0)
        per_type = {}
        for device_type in device_types:
            print(f"{name}, {device_type} ...", flush=True)
            per_type[device_type] = {
                "monte_carlo": monte_carlo(model, device, x_test, test.y, args.chips, device_type, args.batch_size),
                "calibration": calibration(slotted, device, x_few[:CALIBRATION_IMAGES], args.chips, device_type),
                "finetune_epoch": finetune_epoch(model, device, x_train, y_train, device_type),
            }
        results[name] = per_type
        rows += _rows(name, per_type)
    os.makedirs(args.out, exist_ok=True)
    write_json({"args": vars(args), "machine": machine, "models": results}, os.path.join(args.out, "gpu.json"))
    print(f"\n{args.device}; {args.chips} timed chips (medians); Monte Carlo over the whole test set "
          f"({args.synthetic_images} random images for the ResNets), batch {args.batch_size}; calibration on "
          f"{CALIBRATION_IMAGES} images; one fine-tune epoch on {args.train_images:,} images\n{machine}\n")
    print(format_table(["model", "device type", "Monte Carlo session", "s per chip", "max accuracy diff (points)",
                        f"chip 0's max output diff ({OUTPUT_IMAGES} images, relative)", "calibration s per chip",
                        "fine-tune epoch s"], rows, "lllrrrrr", markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
