"""Replays bad and hostile inputs against the command line (issue 10).

Every case must end with exit code 2 and one line on stderr naming the culprit, leave the working
folder exactly as it found it (no file new, changed or removed) and run no code from the data.
The cases reach as far as their error needs, on the embedded digits model, so the whole table
takes seconds.
"""
from __future__ import annotations

import builtins
import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL
from graph_builders import make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.cli import main

MODEL = "in.onnx"  # a copy of the digits model in the working folder
FAST = ["--quiet", "--samples", "2", "--limit", "20"]


def _after(_setup: None, *argv: str) -> list[str]:
    """``argv``, once the setup expression before it has run."""
    return list(argv)


def _edit_model(path: str, edit: Callable[[onnx.ModelProto], None]) -> str:
    model = onnx.load(str(DIGITS_MODEL))
    edit(model)
    onnx.save(model, path)
    return path


def _set_weight(name: str, value: float) -> Callable[[onnx.ModelProto], None]:
    def edit(model: onnx.ModelProto) -> None:
        tensor = next(t for t in model.graph.initializer if t.name == name)
        array = numpy_helper.to_array(tensor).copy()
        array.flat[3] = value
        tensor.CopyFrom(numpy_helper.from_array(array, name))
    return edit


def _custom_op(model: onnx.ModelProto) -> None:
    first = model.graph.node[0]
    first.output[0], original = first.output[0] + "_pre", first.output[0]
    model.graph.node.insert(1, helper.make_node("Foo", [first.output[0]], [original], name="foo", domain="com.example"))
    model.opset_import.append(helper.make_opsetid("com.example", 1))


def _uint8_input(model: onnx.ModelProto) -> None:
    data = model.graph.input[0]
    data.type.tensor_type.elem_type = TensorProto.UINT8
    for node in model.graph.node:
        node.input[:] = [f"{data.name}_float" if i == data.name else i for i in node.input]
    model.graph.node.insert(0, helper.make_node("Cast", [data.name], [f"{data.name}_float"], name="cast", to=TensorProto.FLOAT))


def _no_analog_layer(path: str) -> str:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    onnx.save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _npz(path: str, x: np.ndarray | None = None, y: np.ndarray | None = None) -> str:
    x = np.full((4, 1, 8, 8), 100, np.float32) if x is None else x
    y = np.arange(len(x)) % 10 if y is None else y
    np.savez(path, x=x, y=y)
    return f"npz:{path}"


def _pixels(value: float) -> np.ndarray:
    x = np.full((4, 1, 8, 8), 100, np.float32)
    x[2, 0, 3, 3] = value
    return x


def _device_file(path: str, layers: dict) -> str:
    Path(path).write_text(json.dumps({"default": "lognormal:sigma=0.5", "layers": layers}))
    return path


class _Payload:
    """Pickles to a call of ``function(argument)``: what a crafted dataset runs on load."""

    def __init__(self, function, argument: str):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


def _cifar(folder: str, payload: _Payload) -> str:
    os.mkdir(folder)
    with open(os.path.join(folder, "test_batch"), "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0]}, f)
    return f"cifar10:{folder}"


MARKER = "pwned"  # the file the pickle payloads would create

# id -> (argv built in the working folder, text the message must contain)
CASES: dict[str, tuple[Callable[[], list[str]], str]] = {
    # outputs: nothing overwritten, nothing left half-written
    "evaluate --json is the input model": (lambda: ["evaluate", MODEL, *FAST, "--json", MODEL], "would overwrite the input"),
    "evaluate --plot is the input model": (
        lambda: ["evaluate", MODEL, *FAST, "--sigma-sweep", "0,0.5", "--plot", MODEL], "--plot in.onnx"),
    "evaluate --json is the data file": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz"), "--json", "d.npz"], "would overwrite the input d.npz"),
    "evaluate --json is the device file": (
        lambda: ["evaluate", MODEL, *FAST, "--device", _device_file("dev.json", {}), "--json", "dev.json"],
        "would overwrite the input dev.json"),
    "evaluate --json is a directory": (lambda: _after(os.mkdir("reports"), "evaluate", MODEL, *FAST, "--json", "reports"),
                                       "--json reports: is a directory"),
    # a pipe stands for /dev/null and the like, which a rename as root would replace
    "evaluate --json is a named pipe": (lambda: _after(os.mkfifo("pipe"), "evaluate", MODEL, *FAST, "--json", "pipe"),
                                        "not a regular file"),
    "evaluate default plot is a directory": (
        lambda: _after(os.mkdir("in.sigma.png"), "evaluate", MODEL, *FAST, "--sigma-sweep", "0,0.5"), "is a directory"),
    "deploy -o is the input model": (lambda: ["deploy", MODEL, "-o", MODEL], "would overwrite the input"),
    "deploy -o is the input, --json unwritable": (
        lambda: ["deploy", MODEL, "-o", MODEL, "--json", "/proc/x"], "in.onnx"),
    "deploy --json unwritable after -o": (lambda: ["deploy", MODEL, "-o", "out.onnx", "--json", "/proc/x/r.json"],
                                          "--json /proc/x/r.json: cannot write there"),
    "deploy --json is a directory": (lambda: _after(os.mkdir("d"), "deploy", MODEL, "-o", "out.onnx", "--json", "d"),
                                     "is a directory"),
    "deploy --json equals -o": (lambda: ["deploy", MODEL, "-o", "out.onnx", "--json", "out.onnx"], "also the path of -o"),
    "deploy -o is a symlink to the input": (lambda: _after(os.symlink(MODEL, "link.onnx"), "deploy", MODEL, "-o", "link.onnx"),
                                            "would overwrite the input"),
    "deploy -o is a hard link to the input": (lambda: _after(os.link(MODEL, "hard.onnx"), "deploy", MODEL, "-o", "hard.onnx"),
                                              "would overwrite the input"),
    "deploy -o under a file": (lambda: ["deploy", MODEL, "-o", "in.onnx/out.onnx"], "cannot write there"),
    "inspect --json is the input model": (lambda: ["inspect", MODEL, "--json", MODEL], "would overwrite the input"),
    "finetune --json unwritable after -o": (
        lambda: ["finetune", MODEL, "--quiet", "--epochs", "1", "--limit", "20", "-o", "out.onnx", "--json", "/proc/x"],
        "--json /proc/x"),
    "compile -o is the input model": (lambda: ["compile", MODEL, "--quiet", "-o", MODEL], "would overwrite the input"),
    "compile --simulate-output unwritable": (
        lambda: ["compile", MODEL, "--quiet", "-o", "out.onnx", "--simulate-output", "/proc/x/sim.onnx"], "--simulate-output"),
    "compile report path is a directory": (
        lambda: _after(os.mkdir("out.report.json"), "compile", MODEL, "--quiet", "-o", "out.onnx"), "report out.report.json"),
    "compile plot path is a directory": (
        lambda: _after(os.mkdir("out.sigma.png"), "compile", MODEL, "--quiet", "-o", "out.onnx"), "plot out.sigma.png"),
    # untrusted data runs no code
    "cifar10 pickle calling os.system": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _cifar("cifar", _Payload(os.system, f"touch {MARKER}"))],
        "refused to unpickle 'posix.system'"),
    "cifar10 pickle calling builtins.exec": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _cifar("cifar", _Payload(builtins.exec, f"open({MARKER!r}, 'w')"))],
        "refused to unpickle 'builtins.exec'"),
    # numbers that would silently give wrong results
    "NaN weight": (lambda: ["evaluate", _edit_model("nan.onnx", _set_weight("conv1.weight", np.nan)), *FAST],
                   "initializer 'conv1.weight'"),
    "Inf weight, deploy": (lambda: ["deploy", _edit_model("inf.onnx", _set_weight("fc2.bias", np.inf)), "-o", "out.onnx"],
                           "initializer 'fc2.bias'"),
    "NaN weight, finetune": (
        lambda: ["finetune", _edit_model("nan.onnx", _set_weight("fc1.weight", np.nan)), "--quiet", "-o", "out.onnx"],
        "initializer 'fc1.weight'"),
    "NaN pixel": (lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", _pixels(np.nan))], "NaN or Inf pixel"),
    "Inf pixel": (lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", _pixels(np.inf))], "NaN or Inf pixel"),
    "label 42": (lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", y=np.array([0, 1, 42, 3]))],
                 "10 classes"),
    "label -1": (lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", y=np.array([0, -1, 2, 3]))], "e.g. -1"),
    "label out of range, finetune": (
        lambda: ["finetune", MODEL, "--quiet", "-o", "out.onnx", "--data", _npz("d.npz", y=np.array([0, 1, 2, 10]))],
        "10 classes"),
    "lognormal sigma=inf": (lambda: ["evaluate", MODEL, *FAST, "--device", "lognormal:sigma=inf"], "sigma=inf"),
    "quantize levels=inf": (lambda: ["evaluate", MODEL, *FAST, "--device", "quantize:levels=inf"], "levels=inf"),
    "deploy without analog layer": (lambda: ["deploy", _no_analog_layer("relu.onnx"), "-o", "out.onnx"], "no analog layer"),
    "device file pattern matches nothing": (
        lambda: ["evaluate", MODEL, *FAST, "--device", _device_file("dev.json", {"Conv_*": "none"})], "'Conv_*'"),
    "device file broken glob": (
        lambda: ["evaluate", MODEL, *FAST, "--device", _device_file("dev.json", {"conv[1": "none"})], "'conv[1'"),
    "device file pattern matches nothing, compile": (
        lambda: ["compile", MODEL, "--quiet", "-o", "out.onnx", "--device", _device_file("dev.json", {"fc9": "none"})],
        "'fc9'"),
    # tracebacks before: now one line
    "npz with no samples": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, int))],
        "no samples"),
    "npz with string pixels": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", np.array([["a"] * 64] * 2).reshape(2, 8, 8), np.zeros(2, int))],
        "must be numeric"),
    "npz with string labels": (
        lambda: ["evaluate", MODEL, *FAST, "--data", _npz("d.npz", y=np.array(["a", "b", "c", "d"]))], "must be numeric"),
    "uint8 input with a Cast": (lambda: ["evaluate", _edit_model("u8.onnx", _uint8_input), *FAST], "is uint8"),
    "unknown custom domain": (lambda: ["evaluate", _edit_model("custom.onnx", _custom_op), *FAST], "com.example:Foo"),
    "sigma sweep of ten million points": (
        lambda: ["evaluate", MODEL, *FAST, "--sigma-sweep", "0,1e-7,...,1"], "at most 1000"),
    "sigma sweep with nan": (lambda: ["evaluate", MODEL, *FAST, "--sigma-sweep", "0,nan"], "--sigma-sweep"),
    "preprocess scale 0": (lambda: ["evaluate", MODEL, *FAST, "--scale", "0"], "scale"),
    # numeric options, refused at parse time
    "--samples 0": (lambda: ["evaluate", MODEL, "--samples", "0"], "argument --samples"),
    "--samples 2.5": (lambda: ["evaluate", MODEL, "--samples", "2.5"], "argument --samples"),
    "--limit -5": (lambda: ["evaluate", MODEL, "--limit", "-5"], "argument --limit"),
    "--batch-size 0": (lambda: ["evaluate", MODEL, "--batch-size", "0"], "argument --batch-size"),
    "--seed -1": (lambda: ["evaluate", MODEL, "--seed", "-1"], "argument --seed"),
    "--lr nan": (lambda: ["finetune", MODEL, "-o", "out.onnx", "--lr", "nan"], "argument --lr"),
    "--val-fraction 1": (lambda: ["finetune", MODEL, "-o", "out.onnx", "--val-fraction", "1"], "argument --val-fraction"),
    "--epochs 0": (lambda: ["finetune", MODEL, "-o", "out.onnx", "--epochs", "0"], "argument --epochs"),
    "--lipschitz -1": (lambda: ["finetune", MODEL, "-o", "out.onnx", "--lipschitz", "-1"], "argument --lipschitz"),
    "--budget inf": (lambda: ["compile", MODEL, "-o", "out.onnx", "--budget", "inf"], "argument --budget"),
    "--overhead-weight -1": (lambda: ["compile", MODEL, "-o", "out.onnx", "--overhead-weight", "-1"],
                             "argument --overhead-weight"),
    "--episodes 0": (lambda: ["compile", MODEL, "-o", "out.onnx", "--episodes", "0"], "argument --episodes"),
    "--tile 0": (lambda: ["deploy", MODEL, "-o", "out.onnx", "--tile", "0"], "argument --tile"),
    "--quiet with --verbose": (lambda: ["inspect", MODEL, "--quiet", "--verbose"], "not allowed with"),
    # calibrate: the chip's graph never replaces the model, a bad chip or measurement file is one line
    "calibrate -o is the input model": (lambda: ["calibrate", MODEL, "--chip", "0:1", "-o", MODEL], "would overwrite the input"),
    "calibrate -o is the measurement file": (
        lambda: _after(np.savez("m.npz", images=np.zeros((1, 1, 8, 8), np.float32)), "calibrate", MODEL, "--measured",
                       "m.npz", "-o", "m.npz"), "would overwrite the input m.npz"),
    "calibrate --chip not SEED:INDEX": (lambda: ["calibrate", MODEL, "--chip", "3", "-o", "out.onnx"], "--chip '3'"),
    "calibrate a model without slots": (lambda: ["calibrate", MODEL, "--chip", "0:1", "-o", "out.onnx"],
                                        "no calibratable compensation"),
    "calibrate --dump-measurements without --chip": (
        lambda: ["calibrate", MODEL, "--measured", "m.npz", "-o", "out.onnx", "--dump-measurements", "x.npz"], "give --chip"),
    "evaluate --calibrate 0": (lambda: ["evaluate", MODEL, "--calibrate", "0"], "argument --calibrate"),
}


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder``: files by content hash, links by target, directories as such."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink() or path.is_fifo():
            entries[key] = f"-> {os.readlink(path)}" if path.is_symlink() else "fifo"
        elif path.is_dir():
            entries[key] = "dir"
        else:
            entries[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_changes_nothing_and_says_one_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shutil.copy(DIGITS_MODEL, MODEL)
    model_hash = hashlib.sha256(Path(MODEL).read_bytes()).hexdigest()
    build, culprit = CASES[case]
    argv = build()
    before = _snapshot(tmp_path)

    code = main(argv)

    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("rrcompile: error: "), err
    assert culprit in err
    assert _snapshot(tmp_path) == before
    assert hashlib.sha256(Path(MODEL).read_bytes()).hexdigest() == model_hash
    assert not Path(MARKER).exists()


def test_cases_cover_the_issue():
    assert len(CASES) >= 40
