"""The CorrectNet result table on reachable data: every remedy, every model, sigma in {0.3, 0.5, 0.7}.

For each model and log-normal sigma, on the test set over the same ``--samples`` chips:

- original: the canonical model as shipped;
- Lipschitz: fine-tuned with the spectral Lipschitz penalty on exact weights (``rrcompile finetune``);
- noise injection: fine-tuned on a fresh chip per mini-batch, same epochs (the standard remedy);
- compiled: ``rrcompile compile`` (Lipschitz on sampled chips + RL-chosen compensation), with its
  extra weights and wall time.

Trained models and per-cell results are cached under ``--out`` (keyed by model, sigma, method and
seed), so a rerun only computes what is missing; ``--fresh`` recomputes. Prints one Markdown table.

    python bench/paper_table.py                                # every model whose files exist
    python bench/paper_table.py --models digits --sigmas 0.5   # one cell row, fast
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch

from rrcompile.data import Preprocess, fit_to_input, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator, model_io
from rrcompile.finetune import FinetuneConfig, finetune
from rrcompile.io import load_model, save_model
from rrcompile.lipschitz import LipschitzPenalty
from rrcompile.pipeline import CompileOptions, canonicalize, compile
from rrcompile.report import format_table, percent

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@dataclasses.dataclass(frozen=True)
class Benchmark:
    model: Path
    data: str
    mean: str = "0"
    std: str = "1"


BENCHMARKS = {
    "lenet5-mnist": Benchmark(SHARED / "models" / "lenet5_mnist.onnx", f"mnist:{SHARED / 'mnist'}", "0.1307", "0.3081"),
    "vgg-fashion": Benchmark(REPO / "models" / "vgg_fashion.onnx", f"fashion-mnist:{SHARED / 'fashion-mnist'}"),
    "digits": Benchmark(REPO / "models" / "digits_cnn.onnx", "digits"),
}
METHODS = ("original", "Lipschitz", "noise injection", "compiled")


def cell(cache: Path, fresh: bool, compute) -> dict:
    """The cached result at ``cache`` (JSON), computed and stored when missing or ``fresh``."""
    if cache.exists() and not fresh:
        return json.loads(cache.read_text())
    result = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2))
    return result


def run_method(method: str, model, x_train, y_train, x_test, y_test, device, args, folder: Path) -> dict:
    started = time.perf_counter()
    extra_weights = 0.0
    if method == "original":
        tuned = model
    elif method == "compiled":
        result = compile(model, x_train, y_train, CompileOptions(device, finetune=FinetuneConfig(epochs=args.epochs),
                                                                 seed=args.seed), progress=False, log=lambda _: None)
        tuned, extra_weights = result.model, result.hardware.overhead_percent
    else:
        config = FinetuneConfig(epochs=args.epochs, seed=args.seed, validation_device=device,
                                lipschitz=LipschitzPenalty(args.beta, "spectral") if method == "Lipschitz" else None,
                                noise_injection=device if method == "noise injection" else None)
        tuned = finetune(model, x_train, y_train, config, progress=False).model
    seconds = time.perf_counter() - started
    if method != "original":
        save_model(tuned, folder / f"{method.replace(' ', '_')}.onnx")
    stats = MonteCarloEvaluator(tuned, device).evaluate(x_test, y_test, args.samples, args.seed, progress=False)
    return {**stats.summary(), "extra_weights_percent": extra_weights, "seconds": seconds if method != "original" else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(BENCHMARKS), help=f"comma list of {', '.join(BENCHMARKS)}")
    parser.add_argument("--sigmas", default="0.3,0.5,0.7")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--beta", type=float, default=0.01, help="spectral Lipschitz penalty of the Lipschitz column")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(REPO / "build" / "paper_table"))
    parser.add_argument("--fresh", action="store_true", help="ignore cached results")
    args = parser.parse_args()

    rows, report = [], []
    for name in args.models.split(","):
        bench = BENCHMARKS[name]
        if not bench.model.exists() or (":" in bench.data and not Path(bench.data.split(":", 1)[1]).exists()):
            print(f"skipping {name}: {bench.model} or its data is missing")
            continue
        model = canonicalize(load_model(bench.model))
        input_name, input_shape = model_io(model)
        preprocess = Preprocess.parse("255", bench.mean, bench.std)
        train, test = load_data(bench.data, "train"), load_data(bench.data, "test")
        x_train = fit_to_input(preprocess.apply(train.x), input_name, input_shape)
        x_test = fit_to_input(preprocess.apply(test.x), input_name, input_shape)
        for sigma in (float(s) for s in args.sigmas.split(",")):
            device = parse_device(f"lognormal:sigma={sigma:g}")
            folder = Path(args.out) / name / f"sigma{sigma:g}_seed{args.seed}"
            results = {}
            for method in METHODS:
                results[method] = cell(folder / f"{method.replace(' ', '_')}.json", args.fresh,
                                       lambda: run_method(method, model, x_train, train.y, x_test, test.y, device, args, folder))
                print(f"{name} sigma={sigma:g} {method}: mean {percent(results[method]['mean'])}", flush=True)
            report.append({"model": name, "sigma": sigma, **results})
            rows.append([name, f"{sigma:g}", percent(results["original"]["clean_accuracy"]),
                         *(f"{percent(r['mean'])} / {percent(r['p5'])} / {percent(r['worst'])} / {percent(r['yield'])}"
                           for r in results.values()),
                         f"{results['compiled']['extra_weights_percent']:.2f}%", f"{results['compiled']['seconds']:.0f} s"])

    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "paper_table.json").write_text(json.dumps({"args": vars(args), "cells": report}, indent=2))
    print(f"\n{args.samples} chips per cell, seed {args.seed}, {args.epochs} fine-tuning epochs per method; "
          f"{platform.machine()}, {torch.get_num_threads()} threads. Cells: mean / 5th pct / worst / yield.\n")
    print(format_table(["model", "sigma", "clean", *METHODS, "extra weights", "compile time"], rows,
                       "lr" + "r" * (len(METHODS) + 3), markdown=True))


if __name__ == "__main__":
    main()
