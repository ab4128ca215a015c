"""How rrcompile's cost grows with the work (issue 13), measured side by side in one run.

1. Monte Carlo chips per second on the VGG-style net (Fashion-MNIST test set): in this process,
   then on a local Ray with 1 and with 2 workers (``rrcompile.executor``), over the same chips;
   the per-chip accuracies must be identical. Ray's start is not timed; each map's ``ray.put`` and
   the workers' evaluator builds are (a map pays them every time).
2. Cost against model size, each model in a fresh process (its own peak memory): LeNet-5
   (MNIST), the VGG-style net (Fashion-MNIST), a ResNet-20-style CIFAR-shaped net and a
   ResNet-50-shaped ImageNet-size net. The two ResNets are written here in torch (BatchNorm,
   residual adds; random weights and random images, as only the time matters) and exported with
   ``torch.onnx.export``. Per model: MACs and weights per sample, inspect seconds (load,
   canonicalize, list the analog layers), Monte Carlo seconds per chip (and per image x chip),
   compile seconds (``pipeline.compile`` with the default options, no report; not for the
   ResNet-50, whose compile on 2 CPU cores would take hours) and the process's peak memory.

Writes ``scaling.json`` and ``scaling.png`` (log-log: cost against MACs per sample) to ``--out``
and prints the tables, Markdown, last. ``--quick`` runs every step on a tiny setting (a few
images, one or two chips, the shortest compile) to check the script, not to measure.

    python bench/scaling.py              # the measurement (tens of minutes on 2 CPU cores)
    python bench/scaling.py --quick --out /tmp/scaling
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import platform
import resource
import sys
import time
import warnings
from pathlib import Path
from queue import Empty

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
sys.path.insert(0, str(REPO))

from rrcompile.data import Preprocess, fit_to_input, load_data  # noqa: E402
from rrcompile.devices import parse_device  # noqa: E402
from rrcompile.evaluate import MonteCarloEvaluator  # noqa: E402
from rrcompile.executor import IN_PROCESS, RayExecutor  # noqa: E402
from rrcompile.finetune import FinetuneConfig  # noqa: E402
from rrcompile.graph import analog_layers, macs_per_sample, model_io, tensor_shapes  # noqa: E402
from rrcompile.pipeline import canonicalize  # noqa: E402
from rrcompile.report import format_table  # noqa: E402

DEVICE = "lognormal:sigma=0.5"
SEED = 0
# name -> where the model and its data come from, and the images each stage uses
MODELS = {
    "lenet5-mnist": dict(file=SHARED / "models" / "lenet5_mnist.onnx", data=f"mnist:{SHARED / 'mnist'}",
                         mean="0.1307", std="0.3081", compile=True),
    "vgg-fashion": dict(file=REPO / "models" / "vgg_fashion.onnx", data=f"fashion-mnist:{SHARED / 'fashion-mnist'}",
                        mean="0", std="1", compile=True),
    "resnet20-cifar": dict(torch="resnet20", shape=(3, 32, 32), classes=10, compile=True),
    "resnet50-imagenet": dict(torch="resnet50", shape=(3, 224, 224), classes=1000, compile=False),
}
# images and chips per stage: (Monte Carlo test images, chips, training images for compile);
# random-data models take fewer test images where one image costs a real model's hundred
FULL = {"quick": False, "workers_chips": 20, "workers_images": None, "test": {"resnet50-imagenet": 64, "resnet20-cifar": 2000},
        "chips": {"resnet50-imagenet": 1}, "default_chips": 5, "train": 10_000}
QUICK = {"quick": True, "workers_chips": 2, "workers_images": 100, "test": {"resnet50-imagenet": 2}, "default_test": 100,
         "chips": {"resnet50-imagenet": 1}, "default_chips": 2, "train": 300}


# --- the two ResNets, in torch ------------------------------------------------------------------

def _resnet(kind: str):
    import torch
    from torch import nn

    def bn(channels: int) -> nn.BatchNorm2d:
        layer = nn.BatchNorm2d(channels)
        # running statistics away from 0 and 1, so that folding BatchNorm into the conv is real work
        layer.running_mean.normal_(0, 0.1)
        layer.running_var.uniform_(0.5, 1.5)
        return layer

    class Basic(nn.Module):
        """ResNet-20's block: two 3x3 convolutions and a residual add (1x1 projection when the shape changes)."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), bn(cout), nn.ReLU(),
                                      nn.Conv2d(cout, cout, 3, 1, 1, bias=False), bn(cout))
            self.skip = nn.Identity() if stride == 1 and cin == cout else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    class Bottleneck(nn.Module):
        """ResNet-50's block: 1x1, 3x3, 1x1 (four times wider out) and a residual add."""

        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = 4 * width
            self.body = nn.Sequential(nn.Conv2d(cin, width, 1, bias=False), bn(width), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride, 1, bias=False), bn(width), nn.ReLU(),
                                      nn.Conv2d(width, cout, 1, bias=False), bn(cout))
            self.skip = nn.Identity() if stride == 1 and cin == cout else \
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

        def forward(self, x):
            return torch.relu(self.body(x) + self.skip(x))

    torch.manual_seed(SEED)
    layers: list = []
    if kind == "resnet20":
        layers += [nn.Conv2d(3, 16, 3, 1, 1, bias=False), bn(16), nn.ReLU()]
        cin = 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            for block in range(3):
                layers.append(Basic(cin, cout, stride if block == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    else:
        layers += [nn.Conv2d(3, 64, 7, 2, 3, bias=False), bn(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = 64
        for width, blocks, stride in [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)]:
            for block in range(blocks):
                layers.append(Bottleneck(cin, width, stride if block == 0 else 1))
                cin = 4 * width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2048, 1000)]
    return nn.Sequential(*layers).eval()


def export_resnet(kind: str, shape: tuple[int, ...]) -> onnx.ModelProto:
    """The ResNet ``kind`` with random weights, exported to ONNX with a symbolic batch."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript exporter: the torch.export one needs onnxscript, which rrcompile does not install
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(_resnet(kind), torch.zeros(1, *shape), buffer, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
                          opset_version=17, dynamo=False,
                          # PRESERVE (the module is in eval mode) keeps BatchNormalization nodes, which
                          # EVAL would fold into the convolutions here, and no constant folding either:
                          # folding them is rrcompile's canonicalize's work, part of what is timed
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


# --- data -----------------------------------------------------------------------------------------

def model_and_data(name: str, test_images: int | None, train_images: int):
    """(model as written, x_test, y_test, x_train, y_train), inputs prepared for the model."""
    spec = MODELS[name]
    if "file" in spec:
        model = onnx.load(str(spec["file"]))
        preprocess = Preprocess.parse("255", spec["mean"], spec["std"])
        test = load_data(spec["data"], "test").subset(test_images)
        train = load_data(spec["data"], "train").subset(train_images)
        x_test, x_train = (fit_to_input(preprocess.apply(d.x), *model_io(model), data_name=d.name) for d in (test, train))
        return model, x_test, test.y, x_train, train.y
    model = export_resnet(spec["torch"], spec["shape"])
    rng = np.random.default_rng(SEED)
    n_test = test_images or 1000
    x = rng.standard_normal((n_test + train_images, *spec["shape"]), dtype=np.float32)
    y = rng.integers(0, spec["classes"], n_test + train_images)
    return model, x[:n_test], y[:n_test], x[n_test:], y[n_test:]


# --- 1. workers --------------------------------------------------------------------------------------

def measure_workers(settings: dict) -> dict:
    model, x, y, _, _ = model_and_data("vgg-fashion", settings["workers_images"], 1)
    evaluator = MonteCarloEvaluator(canonicalize(model), parse_device(DEVICE))
    chips = settings["workers_chips"]
    rows, reference = [], None
    for label, workers in [("in-process", None), ("Ray, 1 worker", 1), ("Ray, 2 workers", 2)]:
        executor = IN_PROCESS if workers is None else RayExecutor(workers)
        with executor:
            started = time.perf_counter()
            accuracies = evaluator.chip_accuracies(x, y, chips, SEED, progress=False, executor=executor)
            seconds = time.perf_counter() - started
        reference = reference or accuracies
        rows.append({"run": label, "workers": workers, "chips": chips, "images": len(y), "seconds": seconds,
                     "chips_per_second": chips / seconds, "identical": accuracies == reference})
        print(f"  {label}: {chips} chips in {seconds:.1f} s", flush=True)
    for row in rows:
        row["ratio"] = row["chips_per_second"] / rows[0]["chips_per_second"]
    return {"model": "vgg-fashion", "device": DEVICE, "rows": rows}


# --- 2. cost against model size ---------------------------------------------------------------------

def measure_model(name: str, settings: dict, queue) -> None:
    """One model in its own process: its timings and peak memory go back on ``queue``."""
    from rrcompile.pipeline import CompileOptions, compile

    spec = MODELS[name]
    test_images = settings["test"].get(name, settings.get("default_test"))
    chips = settings["chips"].get(name, settings["default_chips"])
    result = {"model": name}
    started = time.perf_counter()
    model, x_test, y_test, x_train, y_train = model_and_data(name, test_images, settings["train"])
    result["load_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    canonical = canonicalize(model)  # what `rrcompile inspect` does before it lists the layers
    shapes, layers = tensor_shapes(canonical), analog_layers(canonical)
    result["macs"] = sum(macs_per_sample(canonical, layer, shapes) or 0 for layer in layers)
    result["inspect_seconds"] = time.perf_counter() - started
    result.update(weights=sum(layer.params for layer in layers), analog_layers=len(layers))

    started = time.perf_counter()
    evaluator = MonteCarloEvaluator(canonical, parse_device(DEVICE))
    result["evaluator_seconds"] = time.perf_counter() - started
    started = time.perf_counter()
    evaluator.chip_accuracies(x_test, y_test, chips, SEED, progress=False)
    seconds = time.perf_counter() - started
    result.update(chips=chips, test_images=len(y_test), seconds_per_chip=seconds / chips,
                  microseconds_per_image_chip=1e6 * seconds / chips / len(y_test))

    if spec["compile"]:
        options = CompileOptions(parse_device(DEVICE), seed=SEED,
                                 **(dict(finetune=FinetuneConfig(epochs=1, validation_chips=1), episodes=2, rl_chips=1,
                                         rl_images=50, calibration_images=32) if settings["quick"] else {}))
        started = time.perf_counter()
        compile(model, x_train, y_train, options, progress=False, log=lambda _: None)
        result.update(compile_seconds=time.perf_counter() - started, train_images=len(y_train))
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    queue.put(result)


def measure_models(names: list[str], settings: dict) -> list[dict]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: peak memory is this model's alone
    results = []
    for name in names:
        queue = context.Queue()
        process = context.Process(target=measure_model, args=(name, settings, queue))
        process.start()
        while True:  # the model's result, or the reason there is none: a process that died reports nothing
            try:
                results.append(queue.get(timeout=5))
                break
            except Empty:
                if not process.is_alive():
                    raise SystemExit(f"scaling: {name}'s process ended (exit code {process.exitcode}) without a result")
        process.join()
        print(f"  {name}: {json.dumps(results[-1])}", flush=True)
    return results


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("compile_seconds", "compile (s)"), ("seconds_per_chip", "Monte Carlo (s per chip)"),
              ("microseconds_per_image_chip", "Monte Carlo (us per image x chip)"), ("peak_rss_mib", "peak memory (MiB)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), dpi=120)
    for ax, (key, label) in zip(axes, panels):
        points = [(r["macs"], r[key], r["model"]) for r in results if r.get(key)]
        ax.loglog([p[0] for p in points], [p[1] for p in points], "o-")
        for macs, value, name in points:
            ax.annotate(name, (macs, value), fontsize=7, textcoords="offset points", xytext=(3, 3))
        ax.set_xlabel("MACs per sample")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny settings: checks the script, measures nothing")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    parser.add_argument("--no-workers", action="store_true", help="skip the Ray workers comparison")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results", help="folder for scaling.json and .png")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}: expected {', '.join(MODELS)}")
    settings = QUICK if args.quick else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}"
    print(f"scaling on {machine}{' (--quick: not a measurement)' if args.quick else ''}", flush=True)

    report = {"machine": machine, "quick": args.quick, "device": DEVICE, "seed": SEED}
    tables = []
    if not args.no_workers:
        print("1. Monte Carlo chips per second, VGG-style net", flush=True)
        report["workers"] = measure_workers(settings)
        tables.append(format_table(
            ["run", "chips", "images", "seconds", "chips / s", "vs in-process", "same accuracies"],
            [[r["run"], r["chips"], f"{r['images']:,}", f"{r['seconds']:.1f}", f"{r['chips_per_second']:.3f}",
              f"{r['ratio']:.2f}x", "yes" if r["identical"] else "NO"] for r in report["workers"]["rows"]], "lrrrrrl"))
    if names:
        print("2. cost against model size", flush=True)
        report["models"] = measure_models(names, settings)
        tables.append(format_table(
            ["model", "MACs / sample", "weights", "inspect s", "MC s / chip (images)", "MC us / image x chip",
             "compile s (train images)", "peak MiB"],
            [[r["model"], f"{r['macs']:,}", f"{r['weights']:,}", f"{r['inspect_seconds']:.1f}",
              f"{r['seconds_per_chip']:.2f} ({r['test_images']:,})", f"{r['microseconds_per_image_chip']:.0f}",
              f"{r['compile_seconds']:.0f} ({r['train_images']:,})" if "compile_seconds" in r else "-",
              f"{r['peak_rss_mib']:,.0f}"] for r in report["models"]], "lrrrrrrr"))
        plot(report["models"], args.out / "scaling.png")
    (args.out / "scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults: {args.out / 'scaling.json'}" + (f", {args.out / 'scaling.png'}" if names else ""))
    print("\n" + "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
