"""The CorrectNet result table on reachable data: every remedy, every model, sigma in {0.3, 0.5, 0.7}.

For each model and log-normal sigma, on the test set over the same ``--samples`` chips:

- original: the canonical model as shipped;
- Lipschitz: fine-tuned with the spectral Lipschitz penalty on exact weights (``rrcompile finetune``);
- noise injection: fine-tuned on a fresh chip per mini-batch, same epochs (the standard remedy);
- noise injection + calibrated: that model compiled (``compile``'s defaults: calibration slots at
  the ranks the agent chooses, no fine-tune), every chip calibrated on 256 unlabeled training images;
- compiled: ``rrcompile compile`` of the model as shipped, the same way, its chips uncalibrated,
  with its extra weights and wall time;
- compiled + calibrated: the same chips, each calibrated as it would be at bring-up.
Every column is evaluated on the same chips.

Every method that fine-tunes does so for the benchmark's own epochs: 5 on the MNIST-sized sets;
30, with a longer patience, on digits (1,347 training images, 10 steps an epoch).
Trained models and per-cell results (with every chip's accuracy) are cached under ``--out``, keyed
by model, sigma, seed, epochs, patience and budget, so a rerun only computes what is missing
(``--fresh`` recomputes). Prints one Markdown table and writes ``paper_table.json`` and, per
model, ``<model>.sigma.png`` (accuracy against sigma per method).

    python bench/paper_table.py                                # every model whose files exist
    python bench/paper_table.py --models digits --sigmas 0.5   # one cell row, fast
    python bench/paper_table.py --workers 2                    # every cell's chips on a local Ray of 2 workers
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import torch

from rrcompile.calibrate import CalibratedEvaluator
from rrcompile.data import Preprocess, fit_to_input, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import ChipStats, MonteCarloEvaluator, model_io
from rrcompile.executor import ChipExecutor, chip_executor
from rrcompile.finetune import FinetuneConfig, finetune
from rrcompile.io import atomic_write, load_model, save_model
from rrcompile.lipschitz import LipschitzPenalty
from rrcompile.pipeline import CompileOptions, canonicalize, compile
from rrcompile.report import format_table, percent, write_json
from rrcompile.torch_graph import default_device

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    model: Path
    data: str
    mean: str = "0"
    std: str = "1"
    epochs: int = 5
    patience: int = 3  # epochs without a better validation result before fine-tuning stops


BENCHMARKS = {
    "lenet5-mnist": Benchmark(SHARED / "models" / "lenet5_mnist.onnx", f"mnist:{SHARED / 'mnist'}", "0.1307", "0.3081"),
    "vgg-fashion": Benchmark(REPO / "models" / "vgg_fashion.onnx", f"fashion-mnist:{SHARED / 'fashion-mnist'}"),
    "digits": Benchmark(REPO / "models" / "digits_cnn.onnx", "digits", epochs=30, patience=10),
}
METHODS = ("original", "Lipschitz", "noise injection", "noise injection + calibrated", "compiled", "compiled + calibrated")
CALIBRATED = {"noise injection + calibrated": "noise injection", "compiled + calibrated": "compiled"}


def plot_methods(curves: dict[str, dict[float, ChipStats]], path: Path, title: str) -> None:
    """Mean (solid) and 5th percentile (dashed) accuracy against sigma, a colour per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (method, sweep), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        sigmas = sorted(sweep)
        ax.plot(sigmas, [100 * sweep[s].mean for s in sigmas], "o-", color=color, label=f"{method}: mean")
        ax.plot(sigmas, [100 * sweep[s].p5 for s in sigmas], "v--", color=color, alpha=0.6, label=f"{method}: 5th pct")
    clean = next(iter(curves.values()))
    ax.axhline(100 * clean[min(clean)].clean_accuracy, color="gray", linestyle=":", label="original: clean")
    ax.set_xlabel("log-normal sigma (each remedy trained for its sigma)")
    ax.set_ylabel("accuracy (%)")
    ax.set_xticks(sorted(clean))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left", ncol=2)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def cell(cache: Path, fresh: bool, compute) -> dict:
    """The cached result at ``cache`` (JSON), computed and stored when missing or ``fresh``."""
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    result = compute()
    write_json(result, cache)
    return result


def run_calibrated(method: str, model, x_train, y_train, x_test, y_test, device, args, folder: Path,
                   executor: ChipExecutor) -> dict:
    """Compile with compile's defaults, then evaluate every chip before and after calibration; the
    result holds both."""
    started = time.perf_counter()
    options = CompileOptions(device, budget=args.budget, seed=args.seed)
    result = compile(model, x_train, y_train, options, progress=False, log=lambda _: None, executor=executor)
    seconds = time.perf_counter() - started
    save_model(result.deployed, folder / f"{method.replace(' ', '_').replace('+', 'plus')}.onnx")
    started = time.perf_counter()
    raw, calibrated = CalibratedEvaluator(result.model, device, result.x_calibration).evaluate(
        x_test, y_test, args.samples, args.seed, progress=False, executor=executor)
    per_chip = (time.perf_counter() - started) / args.samples
    extra = {"extra_weights_percent": result.hardware.overhead_percent, "seconds": seconds, "ranks": result.ranks,
             "evaluate_seconds_per_chip": per_chip}
    return {**calibrated.summary(), "chips": calibrated.chip_accuracies, **extra,
            "uncalibrated": {**raw.summary(), "chips": raw.chip_accuracies}}


def run_method(method: str, model, x_train, y_train, x_test, y_test, device, epochs: int, patience: int, args,
               folder: Path, executor: ChipExecutor) -> dict:
    started = time.perf_counter()
    extra_weights = 0.0
    if method == "original":
        tuned = model
    else:
        config = FinetuneConfig(epochs=epochs, patience=patience, seed=args.seed, validation_device=device,
                                lipschitz=LipschitzPenalty(args.beta, "spectral") if method == "Lipschitz" else None,
                                noise_injection=device if method == "noise injection" else None)
        tuned = finetune(model, x_train, y_train, config, progress=False).model
    seconds = time.perf_counter() - started
    if method != "original":
        save_model(tuned, folder / f"{method.replace(' ', '_')}.onnx")
    stats = MonteCarloEvaluator(tuned, device).evaluate(x_test, y_test, args.samples, args.seed, progress=False,
                                                        executor=executor)
    return {**stats.summary(), "chips": stats.chip_accuracies, "extra_weights_percent": extra_weights,
            "seconds": seconds if method != "original" else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--sigmas", default="0.3,0.5,0.7")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--epochs", type=int, help="fine-tuning epochs for every model (default: each benchmark's own)")
    parser.add_argument("--budget", type=float, default=0.03,
                        help="compile's compensation budget (fraction of analog weights)")
    parser.add_argument("--beta", type=float, default=0.01, help="spectral Lipschitz penalty of the Lipschitz column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "build" / "paper_table"))
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    parser.add_argument("--workers", type=int, help="run every cell's chips on a local Ray with this many workers")
    parser.add_argument("--ray-address", help="run every cell's chips on the Ray cluster at this address")
    args = parser.parse_args()
    with chip_executor(args.workers, args.ray_address) as executor:
        run_cells(args, executor)


def run_cells(args: argparse.Namespace, executor: ChipExecutor) -> None:

    rows, report = [], []
    out = Path(args.out)
    for name in args.models.split(","):
        bench = BENCHMARKS[name]
        if not bench.model.exists() or (":" in bench.data and not Path(bench.data.split(":", 1)[1]).exists()):
            print(f"skipping {name}: {bench.model} or its data is missing")
            continue
        epochs = args.epochs or bench.epochs
        model = canonicalize(load_model(bench.model))
        input_name, input_shape = model_io(model)
        preprocess = Preprocess.parse("255", bench.mean, bench.std)
        train, test = load_data(bench.data, "train"), load_data(bench.data, "test")
        x_train = fit_to_input(preprocess.apply(train.x), input_name, input_shape)
        x_test = fit_to_input(preprocess.apply(test.x), input_name, input_shape)
        curves: dict[str, dict[float, ChipStats]] = {method: {} for method in METHODS}
        for sigma in (float(s) for s in args.sigmas.split(",")):
            device = parse_device(f"lognormal:sigma={sigma:g}")
            key = f"sigma{sigma:g}_seed{args.seed}_epochs{epochs}_patience{bench.patience}_budget{args.budget:g}"
            folder = out / name / key
            results = {}
            for method in METHODS:
                file = folder / f"{method.replace(' ', '_').replace('+', 'plus')}.json"
                if method == "compiled":  # the uncalibrated chips of the compiled + calibrated cell
                    calibrated = cell(folder / "compiled_plus_calibrated.json", args.fresh, lambda: run_calibrated(
                        "compiled + calibrated", model, x_train, train.y, x_test, test.y, device, args, folder,
                        executor))
                    results[method] = {**calibrated["uncalibrated"], "seconds": calibrated["seconds"],
                                       "extra_weights_percent": calibrated["extra_weights_percent"]}
                elif method == "noise injection + calibrated":
                    results[method] = cell(file, args.fresh, lambda: run_calibrated(
                        method, load_model(folder / "noise_injection.onnx"), x_train, train.y, x_test, test.y, device, args,
                        folder, executor))
                else:
                    results[method] = cell(file, args.fresh, lambda: run_method(
                        method, model, x_train, train.y, x_test, test.y, device, epochs, bench.patience, args, folder,
                        executor))
                curves[method][sigma] = ChipStats(results[method]["clean_accuracy"], results[method]["chips"])
                print(f"{name} sigma={sigma:g} {method}: mean {percent(results[method]['mean'])}", flush=True)
            report.append({"model": name, "sigma": sigma, "epochs": epochs,
                           **{m: {k: v for k, v in r.items() if k != "chips"} for m, r in results.items()}})
            compiled = results["compiled + calibrated"]
            rows.append([name, f"{sigma:g}", epochs, percent(results["original"]["clean_accuracy"]),
                         *(f"{percent(r['mean'])} / {percent(r['p5'])} / {percent(r['worst'])} / {percent(r['yield'])}"
                           for r in results.values()),
                         f"{percent(compiled['clean_accuracy'])}, {compiled['mean'] / compiled['clean_accuracy']:.1%}",
                         f"{compiled['extra_weights_percent']:.2f}%", f"{compiled['seconds']:.0f} s",
                         f"{compiled['evaluate_seconds_per_chip']:.2f} s"])
        if len(curves["original"]) > 1:
            plot_methods(curves, out / f"{name}.sigma.png", f"{name}: accuracy over {args.samples} chips per point")

    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__} on {default_device()}"
    write_json({"args": vars(args), "machine": machine, "cells": report}, out / "paper_table.json")
    print(f"\n{args.samples} chips per cell, seed {args.seed}, compensation budget {args.budget:.0%}; {machine}. "
          "Method cells: mean / 5th pct / worst / yield over the test set; compiled + calibrated: its clean accuracy, "
          "its mean as a fraction of it, its extra weights, compile time, and per chip the time to measure, "
          "calibrate and evaluate it twice.\n")
    print(format_table(["model", "sigma", "epochs", "clean", *METHODS, "compiled clean, mean/clean", "extra weights",
                        "compile time", "per chip"], rows, "lrrr" + "r" * (len(METHODS) + 4), markdown=True))


if __name__ == "__main__":
    main()
