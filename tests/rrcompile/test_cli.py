"""The command line: reports on the embedded default, and one-line errors with exit code 2 and no output."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL
from graph_builders import make_model
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
    onnx.save(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
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


# --- defaults: written once, in the configs ------------------------------------------------------

def test_compile_defaults_are_the_compile_options_defaults():
    from rrcompile.cli import DEFAULT_DEVICE, build_parser, compile_options
    from rrcompile.compensation_training import CompensationConfig
    from rrcompile.devices import parse_device
    from rrcompile.finetune import FinetuneConfig
    from rrcompile.pipeline import CompileOptions

    device = parse_device(DEFAULT_DEVICE)
    args = build_parser().parse_args(["compile", "m.onnx", "-o", "out.onnx"])
    assert args.device == DEFAULT_DEVICE
    assert compile_options(args, device) == CompileOptions(device)
    # --batch-size feeds both trainings: their configs must agree on its default
    assert FinetuneConfig().batch_size == CompensationConfig().batch_size == args.batch_size


def test_finetune_and_calibrate_defaults_are_the_configs_defaults():
    from rrcompile.cli import DEFAULT_DEVICE, build_parser, finetune_config
    from rrcompile.data import Preprocess
    from rrcompile.devices import parse_device
    from rrcompile.finetune import FinetuneConfig
    from rrcompile.pipeline import CompileOptions

    parser = build_parser()
    args = parser.parse_args(["finetune", "m.onnx", "-o", "out.onnx"])
    assert finetune_config(args) == FinetuneConfig(validation_device=parse_device(DEFAULT_DEVICE))
    assert Preprocess.parse(args.scale, args.mean, args.std) == Preprocess()
    calibrate = parser.parse_args(["calibrate", "m.onnx", "--chip", "0:0", "-o", "out.onnx"])
    assert calibrate.images == CompileOptions(parse_device(DEFAULT_DEVICE)).calibration_images


# --- calibration: `calibrate`, `evaluate --calibrate` ------------------------------------------

@pytest.fixture(scope="module")
def compiled_digits(tmp_path_factory) -> str:
    """The digits CNN compiled with calibration slots (small settings), deployed to a file."""
    from rrcompile.data import load_data
    from rrcompile.devices import parse_device
    from rrcompile.finetune import FinetuneConfig
    from rrcompile.io import save_model
    from rrcompile.pipeline import CompileOptions, compile

    train = load_data("digits", "train")
    options = CompileOptions(parse_device("lognormal:sigma=0.5"), finetune=FinetuneConfig(epochs=1, validation_chips=2),
                             episodes=4, rl_chips=2, rl_images=200)
    result = compile(onnx.load(str(DIGITS_MODEL)), train.x / np.float32(255), train.y, options, progress=False,
                     log=lambda _: None)
    path = tmp_path_factory.mktemp("compiled") / "digits.onnx"
    save_model(result.deployed, path)
    return str(path)


def test_calibrate_a_simulated_chip_then_the_same_chip_from_its_measurements(compiled_digits, tmp_path, capsys):
    chip, measured, report = tmp_path / "chip.onnx", tmp_path / "chip.npz", tmp_path / "chip.json"
    assert main(["calibrate", compiled_digits, "--chip", "0:4", "-o", str(chip), "--dump-measurements", str(measured),
                 "--json", str(report), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "uncalibrated" in printed and "calibrated" in printed
    result = json.loads(report.read_text())
    assert result["device"] == "lognormal:sigma=0.5"  # the device the model was compiled for
    assert result["calibrated"] > result["uncalibrated"] + 0.05
    again = tmp_path / "again.onnx"
    assert main(["calibrate", compiled_digits, "--measured", str(measured), "-o", str(again), "--quiet"]) == 0
    from_chip = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(chip)).graph.initializer}
    from_file = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(again)).graph.initializer}
    for name, value in from_chip.items():
        np.testing.assert_allclose(from_file[name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("damage,culprit", [
    (lambda m: m.pop("fc1.input"), "fc1.input"),
    (lambda m: m.__setitem__("conv2.output", m["conv2.output"][:, :3]), "conv2.output"),
    (lambda m: m["conv1.output"].__setitem__((0, 0, 0, 0), np.inf), "non-finite"),
])
def test_bad_measurement_files_are_one_line_exit_2_and_no_output(compiled_digits, tmp_path, capsys, damage, culprit):
    measured = tmp_path / "chip.npz"
    assert main(["calibrate", compiled_digits, "--chip", "0:1", "-o", str(tmp_path / "ok.onnx"),
                 "--dump-measurements", str(measured), "--quiet"]) == 0
    arrays = dict(np.load(measured))
    damage(arrays)
    np.savez(measured, **arrays)
    capsys.readouterr()
    assert main(["calibrate", compiled_digits, "--measured", str(measured), "-o", str(tmp_path / "bad.onnx")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and culprit in error and str(measured) in error
    assert not (tmp_path / "bad.onnx").exists()


def test_evaluate_calibrate_reports_both_over_the_same_chips(compiled_digits, tmp_path, capsys):
    report = tmp_path / "report.json"
    assert main(["evaluate", compiled_digits, "--calibrate", "128", "--samples", "3", "--limit", "200",
                 "--json", str(report), "--quiet"]) == 0
    result = json.loads(report.read_text())
    calibrated = result["calibrated"]
    assert set(calibrated) >= {"clean_accuracy", "mean", "std", "p5", "worst", "yield", "chips", "chip_accuracies"}
    assert calibrated["chips"] == result["chips"] == 3 and calibrated["calibration_images"] == 128
    assert calibrated["mean"] > result["mean"]
    assert main(["evaluate", str(DIGITS_MODEL), "--calibrate", "16", "--samples", "1", "--quiet"]) == 2
    assert "no calibratable compensation" in capsys.readouterr().err


# --- scale: Ray workers and the device type ------------------------------------------------------

def test_evaluate_on_ray_workers_reports_the_in_process_chips(compiled_digits, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): --workers is untested")
    reports = {"here": tmp_path / "here.json", "ray": tmp_path / "ray.json"}
    base = ["evaluate", compiled_digits, "--calibrate", "64", "--samples", "4", "--limit", "150", "--quiet"]
    assert main([*base, "--json", str(reports["here"])]) == 0
    assert main([*base, "--json", str(reports["ray"]), "--workers", "2"]) == 0
    here, ray = (json.loads(reports[k].read_text()) for k in ("here", "ray"))
    assert ray["chip_accuracies"] == here["chip_accuracies"]
    assert ray["calibrated"]["chip_accuracies"] == here["calibrated"]["chip_accuracies"]


def test_workers_without_ray_installed_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    assert evaluate("--samples", "2", "--limit", "50", "--workers", "2", "--json", str(tmp_path / "r.json")) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "pip install -e '.[ray]'" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["evaluate", "compile", "finetune", "calibrate"])
def test_cuda_without_a_gpu_is_one_line_exit_2_and_no_output(command, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: --device-type cuda is allowed")
    out = ["-o", str(tmp_path / "out.onnx")] if command != "evaluate" else ["--json", str(tmp_path / "r.json")]
    chip = ["--chip", "0:0"] if command == "calibrate" else []
    assert main([command, str(DIGITS_MODEL), "--device-type", "cuda", "--quiet", *chip, *out]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "no CUDA GPU" in error
    assert list(tmp_path.iterdir()) == []


def test_cuda_is_not_asked_of_ray_workers(capsys):
    assert evaluate("--device-type", "cuda", "--workers", "2") == 2
    assert "drop --workers" in capsys.readouterr().err
