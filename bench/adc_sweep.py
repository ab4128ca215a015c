"""What each ADC bit buys and costs: accuracy and ADC energy against the converters' resolution.

For every model and every resolution ``B`` (default 4..10), the device is
``tile:size=128+adc:bits=B+lognormal:sigma=0.5``: every layer on 128-row arrays, each array's column
outputs through a ``B``-bit ADC (its range fixed per tile on the first 256 training images), the
weights varied log-normally. On the test set, over the same ``--samples`` chips (seed 0) for every
``B``:

- original: the model as shipped, on these chips;
- compiled: ``rrcompile compile`` for this device with its defaults (RL-chosen calibration slots
  scored on calibrated chips through the ADCs; no fine-tune), its chips raw;
- compiled + calibrated: the same chips, each calibrated on 256 unlabeled training images;

and the ADC energy per inference from the deployed graph's hardware report (``E = FOM * 2^B`` per
conversion, ``rrcompile.hardware`` names the constant and its source). The reference is the
compiled model's sigma-0 accuracy (its clean accuracy, float readout); the table names the smallest
``B`` whose compiled + calibrated mean keeps >= 98% of it (and the same for the raw compiled chips).

Prints a Markdown table per model and writes, per model under ``--out``, ``adc_sweep.<model>.json``
(rewritten after every resolution, so a sweep cut short keeps what it finished; ``--replot`` prints
and draws it again) and ``adc_sweep.<model>.png`` (accuracy and energy against bits).

    python bench/adc_sweep.py                         # LeNet-5 and the VGG-style net, B = 4..10, 100 chips
    python bench/adc_sweep.py --quick                 # digits, B = 4 and 8, 3 chips, one epoch: a smoke test
    python bench/adc_sweep.py --jobs 7 --device-type cuda   # a many-core GPU machine: the B values at once
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from paper_table import BENCHMARKS, Benchmark  # bench/ is on sys.path when this script runs
from rrcompile.calibrate import CalibratedEvaluator
from rrcompile.compensation_training import CompensationConfig
from rrcompile.crossbar import ADC_IMAGES, with_adc_ranges
from rrcompile.data import Preprocess, fit_to_input, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator, model_io, use_threads
from rrcompile.finetune import FinetuneConfig
from rrcompile.io import atomic_write, load_model
from rrcompile.pipeline import CompileOptions, canonicalize, compile
from rrcompile.report import format_table, percent, write_json

KEEP = 0.98  # of the sigma-0 accuracy: the bits a design needs
QUICK = dict(models=["digits"], bits=[4, 8], samples=3, epochs=1, episodes=4, rl_chips=2, rl_images=200, test_limit=300)


def spec(bits: int, args: argparse.Namespace) -> str:
    return f"tile:size={args.tile}+adc:bits={bits}+lognormal:sigma={args.sigma:g}"


@functools.lru_cache(maxsize=1)
def _load(bench: Benchmark, test_limit: int | None):
    """(canonical model, prepared train images, train labels, prepared test images, test set)."""
    preprocess = Preprocess.parse("255", bench.mean, bench.std)
    original = canonicalize(load_model(bench.model))
    input_name, input_shape = model_io(original)
    train, test = load_data(bench.data, "train"), load_data(bench.data, "test").subset(test_limit)
    x_train = fit_to_input(preprocess.apply(train.x), input_name, input_shape, data_name=train.name)
    x_test = fit_to_input(preprocess.apply(test.x), input_name, input_shape, data_name=test.name)
    return original, x_train, train.y, x_test, test


def _use_threads(count: int) -> None:
    import torch

    use_threads(count)
    torch.set_num_threads(count)


def run_bits(name: str, bench: Benchmark, args: argparse.Namespace, bits: int) -> dict:
    """One resolution's row: the original and the compiled model on the same chips."""
    original, x_train, y_train, x_test, test = _load(bench, args.test_limit)
    epochs = args.epochs or bench.epochs
    device = with_adc_ranges(original, parse_device(spec(bits, args)), x_train[:ADC_IMAGES])
    started = time.perf_counter()
    before = MonteCarloEvaluator(original, device, device_type=args.device_type).evaluate(
        x_test, test.y, args.samples, args.seed, progress=False)
    options = CompileOptions(device, finetune=FinetuneConfig(epochs=epochs, patience=bench.patience),
                             train=CompensationConfig(epochs=epochs), episodes=args.episodes, rl_chips=args.rl_chips,
                             rl_images=args.rl_images, tile=args.tile, seed=args.seed, device_type=args.device_type)
    result = compile(original, x_train, y_train, options, progress=False, log=lambda _: None)
    compile_seconds = time.perf_counter() - started
    raw, calibrated = CalibratedEvaluator(result.model, device, result.x_calibration, device_type=args.device_type).evaluate(
        x_test, test.y, args.samples, args.seed, progress=False)
    row = {"bits": bits, "device": spec(bits, args), "original": before.summary(), "compiled": raw.summary(),
           "calibrated": calibrated.summary(), "sigma0": calibrated.clean_accuracy,
           "adc_conversions": result.hardware.adc_conversions, "adc_energy_pj": result.hardware.adc_energy_pj,
           "ranks": result.ranks, "overhead_percent": result.hardware.overhead_percent,
           "seconds": time.perf_counter() - started, "compile_seconds": compile_seconds}
    print(f"{name}, {bits} bits: original {percent(before.mean)}, compiled {percent(raw.mean)}, "
          f"calibrated {percent(calibrated.mean)}, {result.hardware.adc_energy_pj / 1e3:.3f} nJ, "
          f"{row['seconds']:.0f} s", flush=True)
    return row


def run_model(name: str, bench: Benchmark, args: argparse.Namespace, save) -> dict:
    """Every resolution's row; ``save`` gets the result so far after each row that completes in order."""
    _, _, _, _, test = _load(bench, args.test_limit)
    rows: list[dict] = []

    def result() -> dict:
        return {"model": name, "data": test.name, "test_images": len(test.y), "epochs": args.epochs or bench.epochs,
                "rows": rows, "complete": len(rows) == len(args.bits),
                "smallest_bits": {column: next((r["bits"] for r in rows if r[column]["mean"] >= KEEP * r["sigma0"]), None)
                                  for column in ("compiled", "calibrated")}}

    if args.jobs > 1:  # one process per resolution, the machine's cores shared among them
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited onnxruntime or torch threads
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, context, initializer=_use_threads, initargs=(threads,)) as pool:
            computed = pool.map(functools.partial(run_bits, name, bench, args), args.bits)
            for row in computed:
                rows.append(row)
                save(result())
    else:
        for bits in args.bits:
            rows.append(run_bits(name, bench, args, bits))
            save(result())  # a long sweep cut short keeps the rows it finished
    return result()


def table(result: dict) -> str:
    return format_table(
        ["ADC bits", "original mean", "compiled mean", "compiled + calibrated mean / worst", "sigma-0", "ADC nJ / inference"],
        [[str(r["bits"]), percent(r["original"]["mean"]), percent(r["compiled"]["mean"]),
          f"{percent(r['calibrated']['mean'])} / {percent(r['calibrated']['worst'])}", percent(r["sigma0"]),
          f"{r['adc_energy_pj'] / 1e3:,.3f}"] for r in result["rows"]], "rrrrrr")


def plot(result: dict, path: Path) -> None:
    """Mean accuracy per column against bits, ADC energy on a log axis beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = [r["bits"] for r in result["rows"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for column, label in (("original", "original"), ("compiled", "compiled"), ("calibrated", "compiled + calibrated")):
        ax.plot(bits, [100 * r[column]["mean"] for r in result["rows"]], "o-", label=label)
    ax.plot(bits, [100 * KEEP * r["sigma0"] for r in result["rows"]], "k--", linewidth=1, label=f"{KEEP:.0%} of sigma-0")
    ax.set_xticks(bits)
    ax.set_xlabel("ADC bits")
    ax.set_ylabel("mean accuracy over chips (%)")
    ax.grid(alpha=0.3)
    energy = ax.twinx()
    energy.semilogy(bits, [r["adc_energy_pj"] / 1e3 for r in result["rows"]], "s:", color="grey")
    energy.set_ylabel("ADC energy per inference (nJ, grey)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(f"{result['model']}: {result['rows'][0]['device'].replace('adc:bits=' + str(bits[0]), 'adc:bits=B')}")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def summarize(result: dict, bits: list[int], samples: int, seed: int, png: Path) -> None:
    """Print a model's table and the smallest resolution that keeps KEEP; draw its plot."""
    print(f"\n{result['model']} on {result['data']} ({result['test_images']} test images, {samples} chips, seed {seed})")
    print(table(result))
    smallest, tried = result["smallest_bits"], f"none of B = {', '.join(map(str, bits))}"
    print(f"smallest B keeping >= {KEEP:.0%} of the sigma-0 accuracy: compiled + calibrated "
          f"{smallest['calibrated'] or tried}, compiled {smallest['compiled'] or tried}\n")
    plot(result, png)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet5-mnist", "vgg-fashion"], choices=sorted(BENCHMARKS))
    parser.add_argument("--bits", type=int, nargs="+", default=list(range(4, 11)))
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--tile", type=int, default=128)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of any training compile runs (default: the benchmark's; none with its defaults)")
    parser.add_argument("--episodes", type=int, default=CompileOptions.episodes)
    parser.add_argument("--rl-chips", type=int, default=CompileOptions.rl_chips)
    parser.add_argument("--rl-images", type=int, default=CompileOptions.rl_images)
    parser.add_argument("--test-limit", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1,
                        help="resolutions computed at once, each in its own process with an equal share of the cores")
    parser.add_argument("--device-type", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where the chips are evaluated and calibrated and compile trains (the agent's "
                             "validation chips stay on onnxruntime's CPU path)")
    parser.add_argument("--quick", action="store_true", help="a smoke test: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--replot", type=Path, metavar="JSON",
                        help="print the table of a saved adc_sweep.<model>.json and draw its PNG beside it")
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    started = time.perf_counter()
    suffix = ".quick" if args.quick else ""

    def save(result: dict) -> None:
        write_json({"machine": f"{platform.node()} ({platform.machine()}, {platform.processor() or '?'}, "
                               f"{os.cpu_count()} CPU cores)",
                    "seconds": time.perf_counter() - started,
                    "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                    "keep": KEEP, **result}, args.out / f"adc_sweep{suffix}.{result['model']}.json")

    if args.replot:  # a saved sweep, finished or cut short: its table and plot again, nothing computed
        result = json.loads(args.replot.read_text())
        done, asked = [row["bits"] for row in result["rows"]], result["options"]["bits"]
        if done != asked:
            print(f"{args.replot}: cut short, B = {', '.join(map(str, done))} of {', '.join(map(str, asked))}")
        summarize(result, done, result["options"]["samples"], result["options"]["seed"], args.replot.with_suffix(".png"))
        return 0
    for name in args.models:
        result = run_model(name, BENCHMARKS[name], args, save)
        summarize(result, args.bits, args.samples, args.seed, args.out / f"adc_sweep{suffix}.{name}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
