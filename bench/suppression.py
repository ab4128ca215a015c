"""Error suppression on a real model: Lipschitz fine-tuning (both penalty forms) vs noise injection.

Every method fine-tunes the same canonical model for the same epochs on the same train split and
seed; each result is evaluated over the same simulated chips (``--samples``, ``--seed``) on the
test set. Prints one Markdown table: clean accuracy, Monte Carlo mean / 5th percentile / worst /
yield, the product of the layers' spectral norms, and the fine-tuning time.

    python bench/suppression.py                       # LeNet-5 on MNIST from ../shared/data
    python bench/suppression.py --model models/digits_cnn.onnx --data digits --mean 0 --std 1
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from onnx import numpy_helper

from rrcompile.data import Preprocess, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.finetune import FinetuneConfig, finetune
from rrcompile.graph import analog_layers
from rrcompile.io import load_model, save_model
from rrcompile.lipschitz import LipschitzPenalty, SpectralReport
from rrcompile.pipeline import canonicalize
from rrcompile.report import format_table, percent

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def spectral_product(model) -> float:
    weights = {t.name: t for t in model.graph.initializer}
    return SpectralReport.of([(layer, numpy_helper.to_array(weights[layer.weight])) for layer in analog_layers(model)]).product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "lenet5_mnist.onnx"))
    parser.add_argument("--data", default=f"mnist:{SHARED / 'mnist'}")
    parser.add_argument("--mean", default="0.1307")
    parser.add_argument("--std", default="0.3081")
    parser.add_argument("--device", default="lognormal:sigma=0.5", help="device of the evaluation chips")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--beta-orthogonal", default="1e-4,1e-3,1e-2", help="comma list: one row per beta")
    parser.add_argument("--beta-spectral", default="0.01,0.1,1", help="comma list: one row per beta")
    parser.add_argument("--combined", default="spectral:0.01", help="FORM:BETA of the Lipschitz + noise injection row")
    parser.add_argument("--noise-injection", default="lognormal:sigma=0.5")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="build/suppression", help="folder for the fine-tuned models and the JSON")
    args = parser.parse_args()

    device = parse_device(args.device)
    preprocess = Preprocess.parse("255", args.mean, args.std)
    model = canonicalize(load_model(args.model))
    train, test = load_data(args.data, "train"), load_data(args.data, "test")
    probe = MonteCarloEvaluator(model, device)
    x_train, x_test = probe.prepare(preprocess.apply(train.x)), probe.prepare(preprocess.apply(test.x))

    methods: dict[str, dict | None] = {"original": None}
    for form, betas in (("orthogonal", args.beta_orthogonal), ("spectral", args.beta_spectral)):
        for beta in parse_floats(betas):
            methods[f"Lipschitz {form} (beta={beta:g})"] = dict(lipschitz=LipschitzPenalty(beta, form))
    injection = parse_device(args.noise_injection)
    methods[f"noise injection ({args.noise_injection})"] = dict(noise_injection=injection)
    form, beta = args.combined.split(":")
    methods[f"Lipschitz {form} (beta={float(beta):g}) + noise injection"] = dict(
        lipschitz=LipschitzPenalty(float(beta), form), noise_injection=injection)
    out = Path(args.out)
    rows, report = [], []
    for label, method in methods.items():
        started = time.perf_counter()
        tuned = model
        if method is not None:
            config = FinetuneConfig(epochs=args.epochs, seed=args.seed, validation_device=device, **method)
            tuned = finetune(model, x_train, train.y, config, progress=False).model
            save_model(tuned, out / f"method{len(rows)}.onnx")
        seconds = time.perf_counter() - started
        stats = MonteCarloEvaluator(tuned, device).evaluate(x_test, test.y, args.samples, args.seed, progress=False)
        product = spectral_product(tuned)
        rows.append([label, percent(stats.clean_accuracy), percent(stats.mean), percent(stats.p5), percent(stats.worst),
                     percent(stats.yield_), f"{product:,.1f}", f"{seconds:.0f} s" if method else "-"])
        report.append({"method": label, **stats.summary(), "spectral_product": product, "finetune_seconds": seconds})
        print(f"done: {label}: mean {100 * stats.mean:.2f}%", flush=True)

    out.mkdir(parents=True, exist_ok=True)
    (out / "suppression.json").write_text(json.dumps({"args": vars(args), "results": report}, indent=2))
    print(f"\n{Path(args.model).name} on {train.name}: {args.epochs} epochs each, seed {args.seed}; "
          f"{args.samples} chips of {args.device} on {len(test.y)} test images; "
          f"{platform.machine()}, {torch.get_num_threads()} threads\n")
    print(format_table(["method", "clean", "mean", "5th pct", "worst", "yield", "prod. spectral norms", "fine-tune"],
                       rows, "lrrrrrrr", markdown=True))


if __name__ == "__main__":
    main()
