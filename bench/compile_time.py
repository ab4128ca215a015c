"""End-to-end ``rrcompile compile`` time, as a user sees it, against model size (issue 13).

Two MNIST models, each compiled by the command line in a fresh process with its defaults
(``--device lognormal:sigma=0.5 --seed 0``, report included):

- LeNet-5 as shipped (``../shared/data/models/lenet5_mnist.onnx``, 61k weights);
- a 376k-weight CNN of the shape a user brought to issue 13, built and trained here: three 3x3
  convolutions of 8, 16 and 24 channels, each with BatchNorm and ReLU, no padding (28 -> 22),
  then dense 11,616 -> 32 -> 10; trained ``--train-epochs`` on the MNIST training set (Adam,
  seeded) and exported with its BatchNormalization nodes, which compile folds.

Per model: the wall seconds of the whole command, its compile and report seconds (from
``OUT.report.json``), and the mean accuracy over the report's chips, original and compiled +
calibrated. Writes ``compile_time.json`` under ``--out`` and prints a Markdown table.
``--quick`` checks the script on a tiny setting (an untrained CNN, 2,000 training and 500 test
images, 3 chips, no sweep, 4 RL episodes on 2 chips), not a measurement.

    python bench/compile_time.py --out build/compile_time
    python bench/compile_time.py --quick --out /tmp/compile_time
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rrcompile.data import load_data
from rrcompile.report import format_table, percent, write_json

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
MNIST = f"mnist:{SHARED / 'mnist'}"
DEVICE = "lognormal:sigma=0.5"
QUICK = ["--limit", "2000", "--test-limit", "500", "--samples", "3", "--sigma-sweep", "", "--episodes", "4",
         "--rl-chips", "2", "--rl-images", "200"]


def cnn_376k() -> nn.Module:
    layers: list[nn.Module] = []
    channels = [1, 8, 16, 24]
    for cin, cout in zip(channels, channels[1:]):
        layers += [nn.Conv2d(cin, cout, 3), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(24 * 22 * 22, 32), nn.ReLU(), nn.Linear(32, 10))


def train_cnn_376k(epochs: int, seed: int) -> onnx.ModelProto:
    """The CNN trained on MNIST (inputs scaled to 0..1, as ``rrcompile compile``'s default
    preprocessing gives them), exported with a symbolic batch."""
    torch.manual_seed(seed)
    model = cnn_376k()
    train = load_data(MNIST, "train")
    x = torch.from_numpy(train.x.reshape(-1, 1, 28, 28).astype(np.float32) / 255)
    y = torch.from_numpy(train.y.astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(y), generator=generator).split(128):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter (no onnxscript here)
        torch.onnx.export(model, torch.zeros(1, 1, 28, 28), buffer, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}}, opset_version=17, dynamo=False,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False)
    return onnx.load_from_string(buffer.getvalue())


def compile_end_to_end(model: Path, extra: list[str], out: Path) -> dict:
    """Run ``rrcompile compile`` on ``model`` in a fresh process; its wall time and report."""
    output = out / f"{model.stem}.compiled.onnx"
    command = [str(Path(sys.executable).with_name("rrcompile")), "compile", str(model), "--data", MNIST, "--device", DEVICE,
               "--seed", "0", "--quiet", "-o", str(output), *extra]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    report = json.loads(output.with_suffix(".report.json").read_text())
    return {"command": " ".join(command), "wall_seconds": wall, "compile_seconds": report["compile_seconds"],
            "report_seconds": report["report_seconds"], "original_mean": report["before"]["mean"],
            "calibrated_mean": report["calibrated"]["mean"], "ranks": report["ranks"],
            "overhead_percent": report["hardware"]["overhead_percent"],
            "analog_weights": report["hardware"]["analog_weights"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-epochs", type=int, default=1, help="epochs of the 376k-weight CNN's own training")
    parser.add_argument("--out", type=Path, default=REPO / "build" / "compile_time")
    parser.add_argument("--quick", action="store_true", help="check the script, not a measurement")
    args = parser.parse_args()
    quick = QUICK if args.quick else []
    lenet = SHARED / "models" / "lenet5_mnist.onnx"
    if not lenet.exists():
        print(f"bench/compile_time.py: {lenet} is missing (it needs ../shared/data)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    cnn = args.out / "cnn376k.onnx"
    onnx.save(train_cnn_376k(0 if args.quick else args.train_epochs, seed=0), str(cnn))
    runs = {"lenet5-mnist": compile_end_to_end(lenet, ["--mean", "0.1307", "--std", "0.3081", *quick], args.out),
            "cnn376k-mnist": compile_end_to_end(cnn, quick, args.out)}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    write_json({"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine, "runs": runs},
               args.out / "compile_time.json")
    print(f"rrcompile compile ... --device {DEVICE} --seed 0 (report included); {machine}\n")
    print(format_table(["model", "analog weights", "end to end s", "compile s", "report s", "original mean",
                        "compiled + calibrated mean", "ranks", "extra weights"],
                       [[name, f"{r['analog_weights']:,}", f"{r['wall_seconds']:.0f}", f"{r['compile_seconds']:.0f}",
                         f"{r['report_seconds']:.0f}", percent(r["original_mean"]), percent(r["calibrated_mean"]),
                         "/".join(map(str, r["ranks"].values())), f"{r['overhead_percent']:.2f}%"]
                        for name, r in runs.items()], "lrrrrrrlr", markdown=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
