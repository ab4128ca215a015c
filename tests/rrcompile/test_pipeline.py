"""The whole compiler on the embedded default, with small settings: every stage runs, and ablate."""
from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, run

from rrcompile.cli import main
from rrcompile.compensation_training import CompensationConfig
from rrcompile.compensation import candidates
from rrcompile.data import load_data
from rrcompile.deploy import compiled_device
from rrcompile.devices import is_variation, parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.errors import OptionError
from rrcompile.finetune import FinetuneConfig
from rrcompile.graph import analog_layers
from rrcompile.hardware import HardwareReport
from rrcompile.lipschitz import LipschitzPenalty
from rrcompile.pipeline import CompileOptions, calibration_ranks, canonicalize, compensation_config, compile, finetune_config
from rrcompile.rl.selection import search_result

DEVICE = parse_device("lognormal:sigma=0.5")


def small(**switches) -> CompileOptions:
    return CompileOptions(DEVICE, finetune=FinetuneConfig(epochs=1, validation_chips=2), train=CompensationConfig(epochs=1),
                          episodes=8, rl_chips=2, rl_images=200, **switches)


@pytest.fixture(scope="module")
def digits():
    train = load_data("digits", "train")
    return onnx.load(str(DIGITS_MODEL)), train.x / np.float32(255), train.y


def test_compile_calibrates_by_default_within_the_budget(digits):
    model, x, y = digits
    result = compile(model, x, y, small(), progress=False, log=lambda _: None)
    # every chip solves its own down projection: none is fitted at compile time
    assert list(result.seconds) == ["canonicalize", "insert calibration slots", "profile layers",
                                    "RL selection", "deploy"]
    assert set(result.selection) == {"none", "greedy", "rl"}
    assert result.selection["rl"].reward >= result.selection["none"].reward
    assert set(result.ranks) == {"conv1", "conv2", "fc1", "fc2"} and result.hardware.overhead_percent <= 3.0
    assert all(c.calibrated for c in candidates(result.deployed)) and len(result.x_calibration) == 256
    onnx.checker.check_model(result.deployed, full_check=True)
    # nothing is fine-tuned, and uncalibrated the slots change nothing: the deployed graph computes
    # the network as given
    np.testing.assert_allclose(run(result.deployed, x[:20]), run(model, x[:20]), atol=1e-5, rtol=1e-5)
    hardware = HardwareReport.from_model(result.deployed)
    assert hardware["calibration"]["images"] == 256 and hardware["calibration"]["seconds_per_chip"] > 0
    assert [slot["layer"] for slot in hardware["calibration"]["slots"]] == ["conv1", "conv2", "fc1", "fc2"]
    assert compiled_device(result.deployed) == DEVICE
    # so its chips, uncalibrated, are the original's: the report measures them once
    assert result.network_as_given
    original, compiled = (MonteCarloEvaluator(m, DEVICE) for m in (canonicalize(model), result.model))
    images = original.prepare(x[:200])
    assert compiled.chip_accuracies(images, y[:200], 3, 0, progress=False) == \
        original.chip_accuracies(images, y[:200], 3, 0, progress=False)


@pytest.mark.parametrize("finetune, stages", [
    ("calibrated", ["canonicalize", "insert calibration slots", "profile layers", "RL selection",
                    "fine-tune for calibration", "deploy"]),
    ("raw", ["canonicalize", "fine-tune", "insert calibration slots", "profile layers", "RL selection", "deploy"]),
])
def test_a_calibrated_compile_fine_tunes_when_asked(digits, finetune, stages):
    model, x, y = digits
    result = compile(model, x, y, small(calibration_finetune=finetune), progress=False, log=lambda _: None)
    assert list(result.seconds) == stages and not result.network_as_given


def test_compile_with_trained_compensation_runs_the_papers_stages(digits):
    model, x, y = digits
    result = compile(model, x, y, small(calibration=False), progress=False, log=lambda _: None)
    assert list(result.seconds) == ["canonicalize", "fine-tune", "insert candidates", "train compensation",
                                    "profile layers", "RL selection", "final training", "deploy"]
    assert set(result.selection) == {"none", "all", "greedy", "rl"} and not result.network_as_given
    assert result.selection["rl"].reward >= result.selection["none"].reward
    assert result.hardware.overhead_percent <= 5.0
    onnx.checker.check_model(result.deployed, full_check=True)
    assert not any(is_variation(n) for n in result.deployed.graph.node)
    assert [i.name for i in result.deployed.graph.input] == ["image"]
    np.testing.assert_allclose(run(result.deployed, x[:20]), run(result.model, x[:20]), atol=1e-5, rtol=1e-5)


def test_stages_can_be_switched_off(digits):
    model, x, y = digits
    bare = compile(model, x, y, small(lipschitz=False, noise_injection=False, compensation=False),
                   progress=False, log=lambda _: None)
    assert list(bare.seconds) == ["canonicalize", "deploy"] and bare.kept == [] and bare.network_as_given
    keep_all = compile(model, x, y, small(lipschitz=False, rl=False, calibration=False), progress=False, log=lambda _: None)
    assert keep_all.kept == ["conv1", "conv2", "fc1", "fc2"] and "rl" not in keep_all.selection


def test_compile_command_writes_model_report_plot_and_simulation_graph(tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    code = main(["compile", str(DIGITS_MODEL), "--data", "digits", "-o", str(out), "--quiet", "--epochs", "1",
                 "--compensation-epochs", "1", "--episodes", "8", "--rl-chips", "2", "--rl-images", "200",
                 "--samples", "3", "--sigma-sweep", "0", "--sweep-samples", "2",
                 "--simulate-output", str(tmp_path / "digits.sim.onnx")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "original" in printed and "compiled" in printed and "time per stage" in printed
    report = json.loads((tmp_path / "digits.report.json").read_text())
    assert report["after"]["chips"] == report["calibrated"]["chips"] == 3
    assert set(report["sigma_sweep"]) == {"original", "compiled", "compiled + calibrated"}
    # nothing fine-tuned: the original's chips are the compiled ones, measured once
    assert report["network_as_given"] and report["before"] == report["after"]
    assert report["sigma_sweep"]["original"] == report["sigma_sweep"]["compiled"]
    # the compile's own sigma joins the sweep: the table's first chips, not measured again
    point = report["sigma_sweep"]["compiled + calibrated"]
    assert [p["sigma"] for p in point] == [0, 0.5] and point[1]["chips"] == 2
    assert point[1]["worst"] >= report["calibrated"]["worst"]
    assert (tmp_path / "digits.sigma.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["evaluate", str(tmp_path / "digits.sim.onnx"), "--samples", "2", "--quiet"]) == 0
    assert "conv1: lognormal:sigma=0.5" in capsys.readouterr().out  # the device the graph carries
    assert main(["evaluate", str(tmp_path / "digits.sim.onnx"), "--device", "lognormal:sigma=0.1", "--quiet"]) == 2
    assert main(["deploy", str(tmp_path / "digits.sim.onnx"), "-o", str(tmp_path / "again.onnx")]) == 0
    onnx.checker.check_model(onnx.load(str(tmp_path / "again.onnx")), full_check=True)


def test_a_budget_below_the_gain_and_offset_floor_is_refused(digits):
    model, x, y = digits
    with pytest.raises(OptionError, match="at least 1.36%"):
        compile(model, x, y, small(budget=0.01), progress=False, log=lambda _: None)


def test_compile_refuses_a_bad_budget_without_output(tmp_path, capsys):
    out = tmp_path / "x.onnx"
    assert main(["compile", str(DIGITS_MODEL), "-o", str(out), "--budget", "0", "--quiet"]) == 2
    assert "--budget" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_package_exposes_the_compiler():
    import rrcompile

    assert rrcompile.compile is compile and rrcompile.CompileOptions is CompileOptions


def test_compile_without_report_writes_the_model_and_a_report_of_the_compile_only(tmp_path, capsys):
    out = tmp_path / "digits.onnx"
    assert main(["compile", str(DIGITS_MODEL), "-o", str(out), "--quiet", "--epochs", "1", "--episodes", "4",
                 "--rl-chips", "2", "--rl-images", "200", "--no-report"]) == 0
    report = json.loads((tmp_path / "digits.report.json").read_text())
    assert "before" not in report and "calibrated" not in report and report["report_seconds"] == 0
    assert report["compile_seconds"] > 0 and not (tmp_path / "digits.sigma.png").exists()
    assert "--no-report" in capsys.readouterr().out
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)


def test_compile_report_measures_the_original_apart_once_compile_changed_the_network(tmp_path):
    out = tmp_path / "digits.onnx"
    assert main(["compile", str(DIGITS_MODEL), "-o", str(out), "--quiet", "--epochs", "1", "--calibration-finetune",
                 "raw", "--episodes", "4", "--rl-chips", "2", "--rl-images", "200", "--samples", "2",
                 "--sigma-sweep", "0,0.5", "--sweep-samples", "2"]) == 0
    report = json.loads((tmp_path / "digits.report.json").read_text())
    assert not report["network_as_given"] and report["before"]["chips"] == 2
    assert set(report["sigma_sweep"]) == {"original", "compiled", "compiled + calibrated"}
    test = load_data("digits", "test")
    original = MonteCarloEvaluator(canonicalize(onnx.load(str(DIGITS_MODEL))), DEVICE)
    assert report["before"]["clean_accuracy"] == original.clean_accuracy(original.prepare(test.x / np.float32(255)), test.y)


def test_a_device_without_lognormal_has_no_sweep_unless_one_is_asked_for(tmp_path, capsys):
    out, device = tmp_path / "digits.onnx", "stuck:p_off=0.01,p_on=0.01"
    # asked for: a one-line refusal before any work, and nothing written
    assert main(["compile", str(DIGITS_MODEL), "-o", str(out), "--device", device, "--sigma-sweep", "0,0.5"]) == 2
    assert "--sigma-sweep needs a 'lognormal' device model" in capsys.readouterr().err and not list(tmp_path.iterdir())
    # the default sweep: nothing to sweep, so no sweep and no plot
    assert main(["compile", str(DIGITS_MODEL), "-o", str(out), "--device", device, "--quiet", "--episodes", "2",
                 "--rl-chips", "2", "--rl-images", "200", "--samples", "2"]) == 0
    report = json.loads((tmp_path / "digits.report.json").read_text())
    assert report["sigma_sweep"] == {} and report["calibrated"]["chips"] == 2
    assert not (tmp_path / "digits.sigma.png").exists()


# --- the caller's configs: compile fills in what its options decide, and never overwrites silently

def test_compile_fills_in_the_fields_its_options_decide_and_keeps_the_rest():
    options = CompileOptions(DEVICE, seed=3, beta=0.1, finetune=FinetuneConfig(epochs=2, lr=1e-4),
                             train=CompensationConfig(epochs=4, lr=1e-2))
    config = finetune_config(options)
    assert (config.epochs, config.lr, config.seed, config.validation_device) == (2, 1e-4, 3, DEVICE)
    assert config.lipschitz.beta == 0.1 and config.noise_injection == DEVICE
    train = compensation_config(options)
    assert (train.epochs, train.lr, train.seed, train.feature_weight) == (4, 1e-2, 3, 0.0)
    assert compensation_config(CompileOptions(DEVICE, noise_injection=False,
                                              train=CompensationConfig(feature_weight=0.5))).feature_weight == 0.5
    # the caller's objects are left as they were
    assert options.finetune == FinetuneConfig(epochs=2, lr=1e-4) and options.train == CompensationConfig(epochs=4, lr=1e-2)
    # a value the caller set that agrees with the options is accepted
    assert finetune_config(CompileOptions(DEVICE, seed=5, finetune=FinetuneConfig(seed=5))).seed == 5


@pytest.mark.parametrize("options, culprit", [
    (CompileOptions(DEVICE, finetune=FinetuneConfig(seed=5)),
     "FinetuneConfig.seed=5 conflicts with compile's 0, which it derives from CompileOptions.seed"),
    (CompileOptions(DEVICE, finetune=FinetuneConfig(calibration_images=64)), "CompileOptions.calibration_images"),
    (CompileOptions(DEVICE, lipschitz=False, finetune=FinetuneConfig(lipschitz=LipschitzPenalty(0.1))),
     "FinetuneConfig.lipschitz="),
    (CompileOptions(DEVICE, train=CompensationConfig(seed=1)), "CompensationConfig.seed=1"),
    (CompileOptions(DEVICE, train=CompensationConfig(feature_weight=0.5)), "CompileOptions.noise_injection"),
    (CompileOptions(DEVICE, calibration_finetune="always"),
     "calibration fine-tune 'always': expected one of none, calibrated, raw"),
])
def test_compile_refuses_a_config_field_its_options_decide_otherwise(digits, options, culprit):
    model, x, y = digits
    with pytest.raises(OptionError, match=re.escape(culprit)):
        compile(model, x, y, options, progress=False, log=pytest.fail)  # refused before the first stage


def test_compile_runs_the_strategy_it_is_given(digits):
    class FirstLayerOnly:
        """A new agent: the first slot at its largest rank, nothing elsewhere."""

        name = "first"

        def select(self, env, budget):
            return search_result(env, [env.choices(0, [])[-1]] + [0] * (env.steps - 1), [])

    model, x, y = digits
    result = compile(model, x, y, small(strategy=FirstLayerOnly(), noise_injection=False, lipschitz=False),
                     progress=False, log=lambda _: None)
    assert list(result.selection) == ["none", "greedy", "first"]
    first = result.selection["first"]
    assert first.values[0] > 0 and not any(first.values[1:])
    assert result.ranks == dict(zip(first.layers, first.values))


def test_compile_on_tiles_and_adcs_deploys_the_converters_it_trained_with(digits):
    from rrcompile.crossbar import with_adc_ranges
    from rrcompile.devices import noise_inputs, stored_adc_ranges
    from rrcompile.passes.insert_variation import InsertVariationPass
    from rrcompile.pipeline import canonicalize

    model, x, y = digits
    device = parse_device("tile:size=64+adc:bits=6,noise=0.01+lognormal:sigma=0.5")
    result = compile(model, x, y, dataclasses.replace(small(), device=device), progress=False, log=lambda _: None)
    # the ranges are fixed once, on the network as given (its first training images), and deployed
    fixed = with_adc_ranges(canonicalize(model), device, x[:256]).adc_ranges
    assert {k: v.tolist() for k, v in stored_adc_ranges(result.deployed).items()} == {k: v.tolist() for k, v in fixed.items()}
    assert [c.layer for c in candidates(result.deployed)] == ["conv1", "conv2", "fc1", "fc2"]
    assert compiled_device(result.deployed) == device and result.hardware.adc_conversions == 2698
    onnx.checker.check_model(result.deployed, full_check=True)
    # uncalibrated, the deployed graph computes the compiled network on its ideal chip
    ideal = InsertVariationPass(parse_device("tile:size=64+adc:bits=6+lognormal:sigma=0"), fixed)(result.model).model
    expected = run(ideal, x[:20], **{n.name: np.zeros(n.shape, np.float32) for n in noise_inputs(ideal)})
    assert np.abs(run(result.deployed, x[:20]) - expected).max() <= 1e-5


def test_calibration_slots_are_inserted_no_larger_than_a_correction_can_use(digits):
    model = canonicalize(digits[0])
    layers = {layer.node: layer for layer in analog_layers(model)}
    per_chip, compiled = calibration_ranks(model, 0.2), calibration_ranks(model, 0.2, "compiled")
    assert all(rank <= min(layers[name].rows, layers[name].cols) for name, rank in per_chip.items())
    # a compiled projection may hold more directions than the layer has columns, to choose from
    assert any(compiled[name] > layers[name].cols for name in compiled)
    assert all(compiled[name] >= per_chip[name] for name in compiled)
