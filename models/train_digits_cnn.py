"""Train the small digits CNN that rrcompile ships as its embedded default model and write it as ONNX.

The ONNX graph is assembled with ``onnx.helper`` from the trained weights rather than ``torch.onnx.export``,
so the file has stable, readable node and weight names and is byte-identical for the same ``--seed``.

    python models/train_digits_cnn.py [--seed 0] [-o models/digits_cnn.onnx]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from onnx_export import classifier_model, write_checked

EPOCHS = 50
BATCH = 64
LR = 3e-3
PRODUCER = "rrcompile models/train_digits_cnn.py"


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The project's digits split, raw pixels on a 0..255 scale, [N,1,8,8]; must match rrcompile.data."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    d = load_digits()
    x = (d.images.astype(np.float32) * (255.0 / 16.0))[:, None]   # [N,1,8,8], raw pixels on a 0..255 scale
    x_train, x_test, y_train, y_test = train_test_split(x, d.target, test_size=0.25, random_state=0, stratify=d.target)
    return x_train, x_test, y_train, y_test


def make_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(256, 32), nn.ReLU(),
        nn.Linear(32, 10),
    )


def train(x: np.ndarray, y: np.ndarray, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    net = make_net()
    opt = torch.optim.Adam(net.parameters(), lr=LR)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))
    order = torch.Generator().manual_seed(seed)  # own generator: shuffling must not depend on init's RNG draws
    net.train()
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(xt), generator=order).split(BATCH):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    return net.eval()


def to_onnx(net: nn.Sequential) -> onnx.ModelProto:
    conv1, conv2, fc1, fc2 = (net[i] for i in (0, 2, 6, 8))
    inits = [numpy_helper.from_array(p.detach().numpy().astype(np.float32), f"{name}.{kind}")
             for name, layer in (("conv1", conv1), ("conv2", conv2), ("fc1", fc1), ("fc2", fc2))
             for kind, p in (("weight", layer.weight), ("bias", layer.bias))]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1.weight", "conv1.bias"], ["conv1_out"], "conv1", **conv),
        helper.make_node("Relu", ["conv1_out"], ["relu1_out"], "relu1"),
        helper.make_node("Conv", ["relu1_out", "conv2.weight", "conv2.bias"], ["conv2_out"], "conv2", **conv),
        helper.make_node("Relu", ["conv2_out"], ["relu2_out"], "relu2"),
        helper.make_node("MaxPool", ["relu2_out"], ["pool_out"], "pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool_out"], ["flatten_out"], "flatten", axis=1),
        helper.make_node("Gemm", ["flatten_out", "fc1.weight", "fc1.bias"], ["fc1_out"], "fc1", transB=1),
        helper.make_node("Relu", ["fc1_out"], ["relu3_out"], "relu3"),
        helper.make_node("Gemm", ["relu3_out", "fc2.weight", "fc2.bias"], ["logits"], "fc2", transB=1),
    ]
    return classifier_model("digits_cnn", nodes, inits, [1, 8, 8], PRODUCER,
                            "Small CNN classifier for scikit-learn digits; input is raw pixels / 255.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("digits_cnn.onnx"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    x_train, x_test, y_train, y_test = digits_split()
    x_train, x_test = x_train / np.float32(255), x_test / np.float32(255)  # default preprocessing: scale=255 mean=0 std=1
    net = train(x_train, y_train, args.seed)
    with torch.no_grad():
        ref = net(torch.from_numpy(x_test)).numpy()

    model = to_onnx(net)
    acc = write_checked(model, ref, x_test, y_test, "digits", args.output)
    params = sum(p.numel() for p in net.parameters())
    print(f"wrote {args.output}: {params} params, test accuracy {acc:.4f} ({len(y_test)} samples)")


if __name__ == "__main__":
    main()
