"""Per-chip calibration: exactness, determinism, measured chips, and robustness to noisy devices."""
from __future__ import annotations

import types

import numpy as np
import onnx
import pytest
import torch
from conftest import DIGITS_MODEL, run
from graph_builders import make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.calibrate import (
    IMAGES, PROJECTION_RIDGES, CalibratedEvaluator, Chip, CalibrationConfig, CalibrationError, Calibrator, SimulatedChip,
    _held_out_ridge, _moments, fit_projections, load_measurements, save_measurements, slot_weights, with_ranks,
)
from rrcompile.compensation import DenseCalibration, candidates
from rrcompile.data import load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.graph import analog_layers
from rrcompile.hardware import HardwareReport
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.torch_graph import TorchGraph

RANKS = {"conv1": 4, "conv2": 2, "fc1": 2, "fc2": 0}  # fc2: gain and offset only


@pytest.fixture(scope="module")
def digits():
    train, test = load_data("digits", "train"), load_data("digits", "test")
    return canonicalize(onnx.load(str(DIGITS_MODEL))), train.x / np.float32(255), test.x / np.float32(255), test.y


def slotted(model: onnx.ModelProto, device, x: np.ndarray, ranks=RANKS) -> onnx.ModelProto:
    return fit_projections(InsertCompensationCandidatesPass(ranks=ranks, calibrated=True)(model).model, device, x)


def test_a_chip_without_variation_calibrates_to_the_uncalibrated_model(digits):
    model, x_train, x_test, _ = digits
    device = parse_device("lognormal:sigma=0")
    compiled = slotted(model, device, x_train[:500])
    calibration = Calibrator(compiled).calibrate(SimulatedChip(compiled, device, 0, 3), x_train[:256])
    # per chip: the gain, offset and up weights of every slot, and the down projection of every branch
    assert set(calibration.values) == {name for c in candidates(compiled) for name in (c.up, c.gain, c.offset)} | {
        c.down for c in candidates(compiled) if c.rank}
    chip_graph = calibration.apply(compiled)
    assert np.abs(run(chip_graph, x_test) - run(model, x_test)).max() <= 1e-5


def test_calibration_is_deterministic_and_the_chip_is_the_evaluators(digits):
    model, x_train, x_test, _ = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:500])
    first, second = (Calibrator(compiled).calibrate(SimulatedChip(compiled, device, 0, 5), x_train[:256]) for _ in range(2))
    assert all(np.array_equal(first.values[k], second.values[k]) for k in first.values)
    # a calibrator that calibrated another chip first (its digital twin's outputs kept) gives the same
    calibrator = Calibrator(compiled)
    calibrator.calibrate(SimulatedChip(compiled, device, 0, 4), x_train[:256])
    again = calibrator.calibrate(SimulatedChip(compiled, device, 0, 5), x_train[:256])
    assert all(np.array_equal(first.values[k], again.values[k]) for k in first.values)
    # the simulated chip, layer by layer, computes what the evaluator's session for chip 5 computes
    assert_chip_is_the_evaluators(compiled, device, 5, x_test[:50])


@pytest.mark.parametrize("spec", ["lognormal:sigma=0.5", "lognormal:sigma=0.5+read:eta=0.02"])
def test_rank_configurations_share_the_solves_of_their_common_prefix(digits, spec):
    """The agent's configurations reuse a chip's slot solutions up to the first slot whose rank
    differs; each configuration's values are what a calibration of its own gives."""
    model, x_train, _, _ = digits
    device = parse_device(spec)
    base = InsertCompensationCandidatesPass(ranks=RANKS, calibrated=True)(model).model
    first, second, third = (with_ranks(base, {**RANKS, **change}) for change in ({}, {"fc1": 1}, {"conv2": 1}))
    solves: dict = {}
    for config in (first, second, third):
        shared = Calibrator(config).calibrate(SimulatedChip(config, device, 0, 2), x_train[:64], solves=solves)
        alone = Calibrator(config).calibrate(SimulatedChip(config, device, 0, 2), x_train[:64])
        assert shared.values.keys() == alone.values.keys()
        assert all(np.array_equal(shared.values[k], alone.values[k]) for k in alone.values)
    # 4 solves for the first; the second shares conv1's and conv2's, the third conv1's: 4 + 2 + 3
    assert len(solves) == 9


def assert_chip_is_the_evaluators(compiled: onnx.ModelProto, device, index: int, x: np.ndarray) -> None:
    """Simulated chip ``index``, layer by layer, computes what the evaluator's session for that chip computes."""
    session, feed = MonteCarloEvaluator(compiled, device).chip(0, index)
    chip = SimulatedChip(compiled, device, 0, index)
    analog = {layer.node for layer in analog_layers(compiled)}

    def on_chip(node, attrs, inputs):
        return [torch.from_numpy(chip.run_layer(node.name, inputs[0].numpy()))] if node.name in analog else None

    with torch.no_grad():
        layered = TorchGraph(compiled)(torch.from_numpy(x), intercept=on_chip).numpy()
    np.testing.assert_allclose(layered, session.run(None, {"image": x, **feed()})[0], atol=1e-4, rtol=1e-4)


def linear_model(weight: np.ndarray) -> onnx.ModelProto:
    rows, cols = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="dense")], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", cols])], [numpy_helper.from_array(weight, "W")])
    return canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


class KnownDeviation(Chip):
    """A chip whose one layer computes ``x (W + D)`` with a deviation ``D`` the test knows."""

    def __init__(self, weight: np.ndarray, deviation: np.ndarray):
        self.weight, self.deviation = weight, deviation

    def run_layer(self, layer, x):
        return x @ (self.weight + self.deviation)


@pytest.mark.parametrize("projection", ["chip", "compiled"])
def test_a_full_rank_slot_recovers_the_ideal_output_of_a_known_deviation(projection):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 4)).astype(np.float32)
    compiled = fit_projections(InsertCompensationCandidatesPass(ranks={"dense": 6}, calibrated=True)(linear_model(weight)).model,
                               parse_device("lognormal:sigma=0.3"), rng.standard_normal((200, 6)).astype(np.float32))
    chip = KnownDeviation(weight, rng.standard_normal(weight.shape).astype(np.float32) * 0.5)
    config = CalibrationConfig(ridge=0.0, projection=projection, projection_ridge=0.0)
    calibrated = Calibrator(compiled, config).calibrate(chip, rng.standard_normal((64, 6)).astype(np.float32))
    parameters = {t.name.removeprefix("dense.compensation_"): numpy_helper.to_array(t)
                  for t in calibrated.apply(compiled).graph.initializer if t.name.startswith("dense.compensation_")}
    fresh = rng.standard_normal((32, 6)).astype(np.float32)  # images the calibration never saw
    corrected = DenseCalibration.apply(chip.run_layer("dense", fresh), fresh, parameters["down"], parameters["up"],
                                       parameters["gate"], parameters["gain"], parameters["offset"])
    assert np.abs(chip.run_layer("dense", fresh) - fresh @ weight).max() > 0.5
    np.testing.assert_allclose(corrected, fresh @ weight, atol=1e-4, rtol=1e-4)


def test_measured_chips_calibrate_like_the_chip_in_the_loop(digits, tmp_path):
    model, x_train, x_test, _ = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:500])
    calibrator = Calibrator(compiled)
    in_the_loop = calibrator.calibrate(SimulatedChip(compiled, device, 0, 2), x_train[:128])
    save_measurements(in_the_loop.measurements, tmp_path / "chip2.npz")
    from_file = calibrator.calibrate_measured(load_measurements(tmp_path / "chip2.npz"), "chip2.npz")
    for name, value in in_the_loop.values.items():
        np.testing.assert_allclose(from_file.values[name], value, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("damage,message", [
    (lambda m: m.pop("conv2.output"), "no array 'conv2.output'"),
    (lambda m: m.pop(IMAGES), "no array 'images'"),
    (lambda m: m.__setitem__("fc1.output", m["fc1.output"][:, :5]), "'fc1.output' has shape"),
    (lambda m: m.__setitem__("conv1.input", m["conv1.input"][:, :, :4]), "conv1"),
    (lambda m: m["fc1.input"].__setitem__((0, 0), np.nan), "non-finite"),
    (lambda m: m.__setitem__("conv1.input", m["conv1.input"].astype(np.int64)), "dtype"),
])
def test_bad_measurements_are_one_line_errors(digits, damage, message):
    model, x_train, _, _ = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:300])
    calibrator = Calibrator(compiled)
    measurements = calibrator.calibrate(SimulatedChip(compiled, device, 0, 0), x_train[:32]).measurements
    damage(measurements)
    with pytest.raises(CalibrationError, match=message) as error:
        calibrator.calibrate_measured(measurements, "chip.npz")
    assert "\n" not in str(error.value) and str(error.value).startswith("chip.npz: ")


def test_an_unreadable_measurement_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "chip.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a readable .npz"):
        load_measurements(bad)


@pytest.mark.parametrize("spec", ["lognormal:sigma=0.5+read:eta=0.02", "lognormal:sigma=0.5+stuck:p_off=0.01,p_on=0.01"])
def test_calibration_survives_read_noise_and_stuck_cells(digits, spec):
    model, x_train, x_test, y_test = digits
    device = parse_device(spec)
    compiled = slotted(model, device, x_train[:500])
    raw, calibrated = CalibratedEvaluator(compiled, device, x_train[:256]).evaluate(x_test, y_test, 6, 0, progress=False)
    assert all(np.isfinite(calibrated.chip_accuracies))
    # seeded: 6 chips of digits at sigma 0.5 lose about 20 points; calibration must win most of them back
    assert calibrated.mean > raw.mean + 0.05 and calibrated.worst > raw.worst


def test_ranks_truncate_to_the_strongest_directions_and_cost_what_they_say(digits):
    model, x_train, _, _ = digits
    compiled = slotted(model, parse_device("lognormal:sigma=0.5"), x_train[:500])
    smaller = with_ranks(compiled, {"conv1": 1, "fc1": 0})
    by_name = {c.layer: c for c in candidates(smaller)}
    assert by_name["conv1"].rank == 1 and by_name["fc1"].rank == 0 and by_name["conv2"].rank == 2
    layers = {layer.node: layer for layer in analog_layers(model)}
    assert all(c.weights == slot_weights(layers[c.layer], c.rank) for c in candidates(smaller))
    down = {t.name: numpy_helper.to_array(t) for t in compiled.graph.initializer}["conv1.compensation_down"]
    kept = {t.name: numpy_helper.to_array(t) for t in smaller.graph.initializer}["conv1.compensation_down"]
    np.testing.assert_array_equal(kept, down[:1])
    with pytest.raises(CalibrationError, match="rank 9"):
        with_ranks(compiled, {"conv2": 9})


def test_a_single_pass_of_the_uncalibrated_chip_calibrates_with_the_layer_target(digits):
    model, x_train, x_test, y_test = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:500])
    evaluator = MonteCarloEvaluator(compiled, device)
    before, after = [], []
    for index in range(3):
        chip = SimulatedChip(compiled, device, 0, index)
        # one uncalibrated pass: every layer's input is the raw chip's, as a bring-up without rrcompile records it
        raw = Calibrator(compiled).calibrate(chip, x_train[:256], solve_slots=False).measurements
        single = Calibrator(compiled, CalibrationConfig(target="layer")).calibrate_measured(raw, "raw.npz")
        before.append(evaluator.chip_accuracy(x_test, y_test, 0, index))
        after.append(evaluator.chip_accuracy(x_test, y_test, 0, index, single.values))
    assert np.mean(after) > np.mean(before) + 0.1  # seeded: 65% -> 91% on these chips


def test_read_noise_is_drawn_per_chunk_of_calibration_images(digits):
    model, x_train, _, _ = digits
    device = parse_device("lognormal:sigma=0.3+read:eta=0.05")
    chip = SimulatedChip(slotted(model, device, x_train[:300]), device, 0, 1)
    x = np.repeat(x_train[:1], 2 * SimulatedChip.READ_CHUNK, axis=0)
    out = chip.run_layer("conv1", x)
    first, second = out[:SimulatedChip.READ_CHUNK], out[SimulatedChip.READ_CHUNK:]
    assert np.array_equal(first[0], first[-1]) and not np.array_equal(first[0], second[0])


def test_a_per_chip_projection_finds_a_low_rank_deviation_the_compiled_one_misses():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((12, 6)).astype(np.float32)
    x = rng.standard_normal((256, 12)).astype(np.float32)
    # rank-1 slots; the chip's deviation is rank 1 too, along an input direction no sampled chip prefers
    compiled = fit_projections(InsertCompensationCandidatesPass(ranks={"dense": 1}, calibrated=True)(linear_model(weight)).model,
                               parse_device("lognormal:sigma=0.3"), x)
    deviation = np.outer(rng.standard_normal(12), rng.standard_normal(6)).astype(np.float32)
    chip = KnownDeviation(weight, deviation)
    fresh = rng.standard_normal((64, 12)).astype(np.float32)
    left = {}
    for projection in ("chip", "compiled"):
        config = CalibrationConfig(ridge=1e-6, projection=projection, projection_ridge=1e-6)
        graph = Calibrator(compiled, config).calibrate(chip, x).apply(compiled)
        parameters = {t.name.removeprefix("dense.compensation_"): numpy_helper.to_array(t)
                      for t in graph.graph.initializer if t.name.startswith("dense.compensation_")}
        corrected = DenseCalibration.apply(chip.run_layer("dense", fresh), fresh, parameters["down"], parameters["up"],
                                           parameters["gate"], parameters["gain"], parameters["offset"])
        left[projection] = np.abs(corrected - fresh @ weight).max()
    assert left["chip"] < 1e-3 < left["compiled"]


def test_calibration_options_are_checked():
    with pytest.raises(ValueError, match="projection 'learned'"):
        CalibrationConfig(projection="learned")
    with pytest.raises(ValueError, match="projection ridge -1"):
        CalibrationConfig(projection_ridge=-1)


def test_without_gain_and_offset_a_rank_0_slot_stays_the_raw_layer(digits):
    model, x_train, _, _ = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:500])
    values = Calibrator(compiled, CalibrationConfig(affine=False)).calibrate(SimulatedChip(compiled, device, 0, 1), x_train[:64]).values
    assert values["fc2.compensation_up"].size == 0  # fc2 has rank 0
    assert np.all(values["fc2.compensation_gain"] == 1) and np.all(values["fc2.compensation_offset"] == 0)
    assert np.all(values["conv1.compensation_gain"] == 1) and np.any(values["conv1.compensation_up"] != 0)


def test_a_chip_on_tiles_and_adcs_is_the_evaluators_and_calibrates(digits):
    from rrcompile.calibrate import CalibratedEvaluator
    from rrcompile.crossbar import with_adc_ranges

    model, x_train, x_test, y_test = digits
    device = with_adc_ranges(model, parse_device("tile:size=32+adc:bits=5+lognormal:sigma=0.5"), x_train[:256])
    compiled = slotted(model, device, x_train[:500])
    # the simulated chip runs each layer on its tiles and converters: what the evaluator's chip 2 computes
    assert_chip_is_the_evaluators(compiled, device, 2, x_test[:50])
    raw, calibrated = CalibratedEvaluator(compiled, device, x_train[:256]).evaluate(x_test, y_test, 3, 0, progress=False)
    assert calibrated.mean > raw.mean + 0.05  # the 5-bit converters' error is part of what each chip corrects


def test_adc_noise_is_read_per_chunk_of_calibration_images(digits):
    from rrcompile.crossbar import with_adc_ranges

    model, x_train, _, _ = digits
    noisy = with_adc_ranges(model, parse_device("tile:size=32+adc:bits=8,noise=0.05"), x_train[:256])
    quiet = with_adc_ranges(model, parse_device("tile:size=32+adc:bits=8"), x_train[:256])
    x = np.repeat(x_train[:1], 2 * SimulatedChip.READ_CHUNK, axis=0)
    reads = SimulatedChip(model, noisy, 0, 0).run_layer("conv1", x)
    exact = SimulatedChip(model, quiet, 0, 0).run_layer("conv1", x)
    first, second = reads[:SimulatedChip.READ_CHUNK], reads[SimulatedChip.READ_CHUNK:]
    assert np.array_equal(first[0], first[-1]) and not np.array_equal(first[0], second[0])  # one draw per read
    # conv1 has one tile: the noise is N(0, (0.05 A)^2) per conversion, A the column's range
    spread = (reads[0] - exact[0]).std(axis=(1, 2)) / noisy.adc_ranges["conv1"][:, 0]
    assert np.all((spread > 0.03) & (spread < 0.07))


def test_the_hardware_reports_per_chip_weights_are_what_a_chip_calibration_writes(digits):
    model, x_train, _, _ = digits
    device = parse_device("lognormal:sigma=0.5")
    compiled = slotted(model, device, x_train[:500])
    values = Calibrator(compiled).calibrate(SimulatedChip(compiled, device, 0, 1), x_train[:64]).values
    assert HardwareReport.of(compiled).per_chip_weights == sum(v.size for v in values.values())


@pytest.mark.parametrize("noise, chosen", [(0.0, min(PROJECTION_RIDGES)), (1.0, max(PROJECTION_RIDGES))])
def test_the_projection_ridge_is_chosen_by_held_out_error(noise, chosen):
    # an error that is exactly linear in the input wants the least ridge; pure noise, the most
    rng = np.random.default_rng(3)
    slot = types.SimpleNamespace(is_conv=False, layer=types.SimpleNamespace(rows=12))  # what the fit reads of a slot
    x = torch.from_numpy(rng.standard_normal((256, 12)))
    error = x @ torch.from_numpy(rng.standard_normal((12, 5))) * (1 - noise) \
        + noise * torch.from_numpy(rng.standard_normal((256, 5)))
    half = 128
    folds = [_moments(slot, x[:half], error[:half], 1), _moments(slot, x[half:], error[half:], 1)]
    assert _held_out_ridge(folds, rank=2) == chosen


@pytest.mark.parametrize("pads, strides, dilations", [([0, 0, 0, 0], [1, 1], [1, 1]), ([1, 2, 0, 1], [2, 1], [1, 2])])
def test_a_conv_slots_moments_are_sums_over_its_patches_in_output_order(pads, strides, dilations):
    # each patch must meet the error of its own output position: positions (image, row, column),
    # as a conv's outputs are laid out in columns, over two chunks of images (70 > 64)
    rng = np.random.default_rng(5)
    channels, kernel, cols, images = 3, (3, 2), 4, 70
    slot = types.SimpleNamespace(is_conv=True, attrs=dict(pads=pads, strides=strides, dilations=dilations),
                                 layer=types.SimpleNamespace(rows=channels * kernel[0] * kernel[1], node="conv",
                                                             weight_shape=(cols, channels, *kernel)))
    x = torch.from_numpy(rng.standard_normal((images, channels, 7, 6)))
    padded = torch.nn.functional.pad(x, [pads[1], pads[3], pads[0], pads[2]])
    span = [d * (k - 1) + 1 for d, k in zip(dilations, kernel)]
    out_h, out_w = [(padded.shape[2 + i] - span[i]) // strides[i] + 1 for i in range(2)]
    patches = torch.stack([
        padded[n, :, i * strides[0]:i * strides[0] + span[0]:dilations[0], j * strides[1]:j * strides[1] + span[1]:dilations[1]]
        .reshape(-1) for n in range(images) for i in range(out_h) for j in range(out_w)])
    error = torch.from_numpy(rng.standard_normal((len(patches), cols)))
    moments = _moments(slot, x, error, out_h * out_w)
    assert moments.count == len(patches)
    torch.testing.assert_close(moments.gram, patches.T @ patches)
    torch.testing.assert_close(moments.cross, patches.T @ error)
    torch.testing.assert_close(moments.inputs, patches.sum(0))
