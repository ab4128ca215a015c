"""Monte Carlo throughput vs clean inference, side by side in one run.

Clean: onnxruntime on the canonical model, images per second.
Monte Carlo: the evaluator's per-chip loop on the varied model (draw the chip's noise, run every
batch), images x chips per second. Both use the same model, batch size, images and threads, and
are timed interleaved (clean, chips, clean, chips, ...) so that machine noise hits both alike.
The ratio (Monte Carlo / clean) is printed last; the goal is >= 0.95 (the limit is 1).

    python bench/mc_throughput.py                       # lenet5_mnist on MNIST from ../shared/data
    python bench/mc_throughput.py --model models/digits_cnn.onnx --data digits
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rrcompile.data import Preprocess, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.io import load_model
from rrcompile.pipeline import canonicalize

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SHARED / "models" / "lenet5_mnist.onnx"))
    parser.add_argument("--data", default=f"mnist:{SHARED / 'mnist'}")
    parser.add_argument("--mean", default="0.1307")
    parser.add_argument("--std", default="0.3081")
    parser.add_argument("--device", default="lognormal:sigma=0.5")
    parser.add_argument("--images", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--chips", type=int, default=5, help="chips per timed round")
    parser.add_argument("--rounds", type=int, default=10,
                        help="timed rounds; the ratio pools them (3 gave 0.89-0.97 from run to run on 2 idle cores)")
    args = parser.parse_args()

    model = canonicalize(load_model(args.model))
    evaluator = MonteCarloEvaluator(model, parse_device(args.device), batch_size=args.batch_size)
    data = load_data(args.data).subset(args.images)
    x = evaluator.prepare(Preprocess.parse("255", args.mean, args.std).apply(data.x))
    evaluator.clean_accuracy(x, data.y)  # warm-up: first runs allocate and pick kernels
    evaluator.chip_accuracy(x, data.y, seed=0, chip=0)

    clean_s, chips_s, round_ratios = 0.0, 0.0, []
    for r in range(args.rounds):
        start = time.perf_counter()
        for _ in range(args.chips):
            evaluator.clean_accuracy(x, data.y)
        clean_round = time.perf_counter() - start
        start = time.perf_counter()
        for chip in range(args.chips):
            evaluator.chip_accuracy(x, data.y, seed=0, chip=r * args.chips + chip)
        chips_round = time.perf_counter() - start
        clean_s, chips_s = clean_s + clean_round, chips_s + chips_round
        round_ratios.append(clean_round / chips_round)

    runs = args.rounds * args.chips * len(data.y)
    clean_rate, mc_rate = runs / clean_s, runs / chips_s
    print(f"model {args.model}, {len(data.y)} images, batch {args.batch_size}, device {args.device}")
    print(f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, "
          f"{ort.get_device()}; {args.rounds} rounds x {args.chips} chips")
    print(f"clean inference:       {clean_rate:12,.0f} images/s")
    print(f"Monte Carlo (chips):   {mc_rate:12,.0f} images x chips/s")
    print(f"rounds' ratios: min {min(round_ratios):.3f}, median {np.median(round_ratios):.3f}, max {max(round_ratios):.3f}")
    print(f"ratio {mc_rate / clean_rate:.3f}")


if __name__ == "__main__":
    main()
