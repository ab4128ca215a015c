"""Train a VGG-style CNN on Fashion-MNIST, a benchmark model for rrcompile, and write it as ONNX.

Six 3x3 convolutions in three blocks (16, 32, 64 channels, each block ending in a 2x2 max pool) and two
fully connected layers; no BatchNorm, so every weight layer maps to one analog layer. The ONNX graph is
assembled with ``onnx.helper`` from the trained weights rather than ``torch.onnx.export``, so the file has
stable, readable node and weight names and is byte-identical for the same ``--seed``.

    python models/train_vgg_fashion.py [--data DIR] [--seed 0] [--epochs 6] [-o models/vgg_fashion.onnx]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnx_export import classifier_model, write_checked
from rrcompile.data import load_data

EPOCHS = 6
BATCH = 128
LR = 2e-3
PRODUCER = "rrcompile models/train_vgg_fashion.py"
DEFAULT_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "fashion-mnist"
CONVS = ("conv1", "conv2", "conv3", "conv4", "conv5", "conv6")
CHANNELS = (1, 16, 16, 32, 32, 64, 64)  # conv k maps CHANNELS[k-1] -> CHANNELS[k]; pool after conv2, 4, 6


def make_net() -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(6):
        layers += [nn.Conv2d(CHANNELS[k], CHANNELS[k + 1], 3, padding=1), nn.ReLU()]
        if k % 2 == 1:
            layers.append(nn.MaxPool2d(2))   # 28 -> 14 -> 7 -> 3 (floor, like ONNX MaxPool's default)
    layers += [nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10)]
    return nn.Sequential(*layers)


def weight_layers(net: nn.Sequential) -> list[tuple[str, nn.Module]]:
    """(ONNX name, layer) for the 8 weight layers, in graph order."""
    layers = [m for m in net if isinstance(m, (nn.Conv2d, nn.Linear))]
    return list(zip((*CONVS, "fc1", "fc2"), layers))


def train(x: np.ndarray, y: np.ndarray, seed: int, epochs: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    steps = epochs * -(-len(x) // BATCH)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)  # per step, LR -> 0 at the end
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    order = torch.Generator().manual_seed(seed)  # own generator: shuffling must not depend on init's RNG draws
    net.train()
    for epoch in range(epochs):
        start, total = time.perf_counter(), 0.0
        for idx in torch.randperm(len(xt), generator=order).split(BATCH):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(xt):.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return net.eval()


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(p.detach().numpy().astype(np.float32), f"{name}.{kind}")
             for name, layer in weight_layers(net)
             for kind, p in (("weight", layer.weight), ("bias", layer.bias))]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    pool = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes, x = [], "image"
    for k, name in enumerate(CONVS, start=1):
        nodes += [
            helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name, **conv),
            helper.make_node("Relu", [f"{name}_out"], [f"relu{k}_out"], f"relu{k}"),
        ]
        x = f"relu{k}_out"
        if k % 2 == 0:
            nodes.append(helper.make_node("MaxPool", [x], [f"pool{k // 2}_out"], f"pool{k // 2}", **pool))
            x = f"pool{k // 2}_out"
    nodes += [
        helper.make_node("Flatten", [x], ["flatten_out"], "flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc1.weight", "fc1.bias"], ["fc1_out"], "fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu7_out"], "relu7"),
        helper.make_node("Gemm", ["relu7_out", "fc2.weight", "fc2.bias"], ["logits"], "fc2", transB=1),
    ]
    return classifier_model("vgg_fashion", nodes, inits, [1, 28, 28], PRODUCER,
                            "VGG-style CNN classifier for Fashion-MNIST; input is raw pixels / 255.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="directory with the Fashion-MNIST IDX files (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("vgg_fashion.onnx"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    train_set = load_data(f"fashion-mnist:{args.data}", "train")
    test_set = load_data(f"fashion-mnist:{args.data}", "test")
    # default preprocessing: scale=255 mean=0 std=1, the same float32 arithmetic as rrcompile.data.Preprocess
    x_train, x_test = train_set.x / np.float32(255), test_set.x / np.float32(255)
    start = time.perf_counter()
    net = train(x_train, train_set.y, args.seed, args.epochs)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        ref = torch.cat([net(xb) for xb in torch.from_numpy(x_test).split(1000)]).numpy()

    model = to_onnx(net)
    acc = write_checked(model, ref, x_test, test_set.y, "fashion-mnist", args.output)
    params = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.output}: {params} params, test accuracy {acc:.4f} ({len(test_set.y)} samples), "
          f"trained {args.epochs} epochs in {seconds:.0f} s")


if __name__ == "__main__":
    main()
