"""The command line: reports on the embedded default, and one-line errors with exit code 2 and no output."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL
from onnx import TensorProto, helper

from rrcompile.cli import main


def evaluate(*args: str) -> int:
    return main(["evaluate", str(DIGITS_MODEL), "--quiet", *args])


def test_evaluate_prints_the_report_and_writes_json_and_plot(tmp_path, capsys):
    report, plot = tmp_path / "report.json", tmp_path / "sweep.png"
    assert evaluate("--samples", "3", "--limit", "100", "--seed", "5", "--json", str(report),
                    "--sigma-sweep", "0,0.4,...,0.8", "--plot", str(plot)) == 0
    out = capsys.readouterr().out
    for row in ("clean", "chips: mean", "chips: 5th percentile", "chips: worst", "yield (>= 95% of clean)"):
        assert row in out
    content = json.loads(report.read_text())
    assert content["samples"] == 3 and len(content["chip_accuracies"]) == 3
    assert [entry["sigma"] for entry in content["sigma_sweep"]] == [0, 0.4, 0.8]
    assert content["sigma_sweep"][0]["mean"] == pytest.approx(content["clean_accuracy"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_the_same_report(tmp_path):
    reports = [tmp_path / "a.json", tmp_path / "b.json"]
    for report in reports:
        assert evaluate("--samples", "3", "--limit", "100", "--seed", "2", "--json", str(report)) == 0
    first, second = (json.loads(r.read_text()) for r in reports)
    assert first["chip_accuracies"] == second["chip_accuracies"]


def test_inspect_lists_analog_layers(capsys, tmp_path):
    assert main(["inspect", str(DIGITS_MODEL), "--tile", "64", "--json", str(tmp_path / "layers.json")]) == 0
    out = capsys.readouterr().out
    assert "conv1" in out and "fc2" in out and "opset" in out
    layers = json.loads((tmp_path / "layers.json").read_text())["layers"]
    assert [layer["node"] for layer in layers] == ["conv1", "conv2", "fc1", "fc2"]


def _model_without_analog_layer(path) -> str:
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, 8, 8])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


@pytest.mark.parametrize("case, culprit", [
    ("unreadable model", "garbage.onnx"),
    ("missing model", "absent.onnx"),
    ("no analog layer", "no analog layer"),
    ("data shape", "npz:"),
    ("negative sigma", "sigma=-0.1"),
    ("unknown device model", "'gaussian'"),
    ("bad device file", "device.json"),
    ("bad sweep", "--sigma-sweep"),
])
def test_bad_input_is_one_line_exit_2_and_no_output(tmp_path, capsys, case, culprit):
    report = tmp_path / "report.json"
    model, extra = str(DIGITS_MODEL), []
    if case == "unreadable model":
        model = str(tmp_path / "garbage.onnx")
        (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07not a protobuf at all")
    elif case == "missing model":
        model = str(tmp_path / "absent.onnx")
    elif case == "no analog layer":
        model = _model_without_analog_layer(tmp_path / "relu.onnx")
    elif case == "data shape":
        np.savez(tmp_path / "wrong.npz", x=np.zeros((5, 3, 32, 32), np.float32), y=np.zeros(5, np.int64))
        extra = ["--data", f"npz:{tmp_path / 'wrong.npz'}"]
    elif case == "negative sigma":
        extra = ["--device", "lognormal:sigma=-0.1"]
    elif case == "unknown device model":
        extra = ["--device", "gaussian:sigma=0.1"]
    elif case == "bad device file":
        (tmp_path / "device.json").write_text('{"default": "lognormal:sigma=0.5", "layerz": {}}')
        extra = ["--device", str(tmp_path / "device.json")]
    elif case == "bad sweep":
        extra = ["--sigma-sweep", "0,0.1,...", "--plot", str(tmp_path / "sweep.png")]

    code = main(["evaluate", model, "--quiet", "--samples", "2", "--limit", "50", "--json", str(report), *extra])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("rrcompile: error: ")
    assert culprit in err
    assert list(tmp_path.glob("*.json*")) == ([tmp_path / "device.json"] if case == "bad device file" else [])
    assert not list(tmp_path.glob("*.png*"))


@pytest.mark.parametrize("command", ["inspect", "deploy"])
def test_zero_tile_is_refused(tmp_path, capsys, command):
    extra = ["-o", str(tmp_path / "out.onnx")] if command == "deploy" else []
    assert main([command, str(DIGITS_MODEL), "--tile", "0", *extra]) == 2
    assert "argument --tile: '0'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_progress_bars_only_on_a_terminal_or_when_asked_for(capsys):
    argv = ["evaluate", str(DIGITS_MODEL), "--samples", "2", "--limit", "50"]
    assert main(argv) == 0  # stderr captured, so not a terminal
    quiet = capsys.readouterr()
    assert "\r" not in quiet.err + quiet.out and "chips: mean" in quiet.out
    assert main([*argv, "--verbose"]) == 0
    assert "\r" in capsys.readouterr().err
