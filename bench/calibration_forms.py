"""Which calibration form repairs a chip best: the measurement behind ``rrcompile.calibrate``'s design.

One model (as shipped, no fine-tune), calibration slots at fixed ranks, the same chips, the same
256 unlabeled calibration images; per form, the calibrated accuracy over the test set:

- ``compiled``: the down projection ``Wd`` fixed at compile time (error-weighted principal
  directions, ``fit_projections``), the up projection, gain and offset solved per chip;
- ``chip``: ``Wd`` solved per chip as well (reduced-rank ridge regression, ``chip_projection``);
- ``chip-no-gain``: as ``chip``, with the per-column gain and offset left at 1 and 0;
- ``compiled-layer-target``: ``compiled``, each slot matching the ideal ``W x`` on the input its
  layer saw instead of the clean network's output there;
- ``chip@R`` (``--projection-ridges``): ``chip`` with the per-chip projection's ridge at ``R``,
  the measurement behind ``CalibrationConfig.projection_ridge`` (run it on chips of another seed
  than the paper table's, ``--seed 1``, so the choice is not made on the chips it is judged on).

    python bench/calibration_forms.py                                  # LeNet-5, sigma 0.5, 8 chips
    python bench/calibration_forms.py --sigma 0.7 --ranks 4,2,1,0,4 --chips 20
    python bench/calibration_forms.py --forms chip --projection-ridges 0.1,0.03,0.01,0.003 --seed 1 --chips 12
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from rrcompile.calibrate import CalibrationConfig, Calibrator, SimulatedChip, fit_projections
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.graph import analog_layers
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.report import format_table, percent, write_json

from calibration_speed import MODELS, load_benchmark  # noqa: E402  (bench/ is the script's own folder on sys.path)

REPO = Path(__file__).resolve().parents[1]
FORMS = {
    "compiled": CalibrationConfig(projection="compiled"),
    "chip": CalibrationConfig(projection="chip"),
    "chip-no-gain": CalibrationConfig(projection="chip", affine=False),
    "compiled-layer-target": CalibrationConfig(projection="compiled", target="layer"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet5-mnist", choices=sorted(MODELS))
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--ranks", default="4,2,1,0,4", help="a rank per analog layer, in graph order")
    parser.add_argument("--forms", default=",".join(FORMS), help=f"comma list of {', '.join(FORMS)}")
    parser.add_argument("--projection-ridges", default="",
                        help="comma list: the chip form again with each of these projection ridges")
    parser.add_argument("--chips", type=int, default=8)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=str(REPO / "bench" / "results" / "calibration_forms.json"))
    args = parser.parse_args()
    loaded = load_benchmark(args.model)
    if loaded is None:
        raise SystemExit(f"{MODELS[args.model][0]} or its data is missing")
    model, x_train, _, x_test, test = loaded
    device = parse_device(f"lognormal:sigma={args.sigma}")
    layers = analog_layers(model)
    ranks = dict(zip((layer.node for layer in layers), map(int, args.ranks.split(","))))
    slotted = InsertCompensationCandidatesPass(ranks=ranks, calibrated=True)(model).model
    slotted = fit_projections(slotted, device, x_train, seed=args.seed)
    evaluator = MonteCarloEvaluator(slotted, device)
    x_calibration = x_train[:args.images]
    raw = [evaluator.chip_accuracy(x_test, test.y, args.seed, chip) for chip in range(args.chips)]
    forms = {form: FORMS[form] for form in args.forms.split(",")}
    for ridge in filter(None, args.projection_ridges.split(",")):
        forms[f"chip@{float(ridge):g}"] = CalibrationConfig(projection="chip", projection_ridge=float(ridge))
    results, rows = {}, []
    for form, config in forms.items():
        calibrator = Calibrator(slotted, config)
        accuracies, seconds = [], []
        for chip in range(args.chips):
            simulated = SimulatedChip(slotted, device, args.seed, chip, varied=evaluator.varied_model)
            started = time.perf_counter()
            values = calibrator.calibrate(simulated, x_calibration).values
            seconds.append(time.perf_counter() - started)
            accuracies.append(evaluator.chip_accuracy(x_test, test.y, args.seed, chip, values))
        results[form] = {"chips": accuracies, "mean": float(np.mean(accuracies)), "worst": min(accuracies),
                         "calibrate_seconds": seconds}
        rows.append([form, percent(np.mean(accuracies)), percent(min(accuracies)), f"{statistics.median(seconds):.3f}"])
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    write_json({"args": vars(args), "machine": machine, "ranks": ranks, "uncalibrated": raw, "forms": results}, args.json)
    print(f"{args.model}, lognormal sigma {args.sigma}, ranks {args.ranks}, chips 0..{args.chips - 1} of seed {args.seed}, "
          f"{args.images} calibration images; uncalibrated mean {percent(np.mean(raw))}; {machine}\n")
    print(format_table(["form", "calibrated mean", "worst chip", "calibrate: median s"], rows, "lrrr", markdown=True))


if __name__ == "__main__":
    main()
