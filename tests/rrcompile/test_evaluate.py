"""Monte Carlo evaluator: chip semantics, seeded reproducibility, and the programmed weights."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL

from rrcompile.data import Preprocess, load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import ChipStats, MonteCarloEvaluator, split_programming
from rrcompile.graph import analog_layers
from rrcompile.pipeline import canonicalize


@pytest.fixture(scope="module")
def digits():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    data = load_data("digits", "test").subset(120)
    return model, Preprocess.parse("255", "0", "1").apply(data.x), data.y


def logits(session, x, feed) -> np.ndarray:
    return session.run(None, {"image": x, **feed()})[0]


@pytest.mark.parametrize("spec", ["lognormal:sigma=0.5", "lognormal:sigma=0.3+read:eta=0.02"])
def test_two_batches_of_one_chip_see_the_same_weights(digits, spec):
    model, x, _ = digits
    evaluator = MonteCarloEvaluator(model, parse_device(spec))
    session, feed = evaluator.chip(seed=0, chip=3)
    if evaluator.read_noise:  # read noise is per run: fix it to compare the chip's programmed part
        fixed = feed()
        feed = lambda: fixed  # noqa: E731
    whole = logits(session, x, feed)
    split = np.concatenate([logits(session, x[:50], feed), logits(session, x[50:], feed)])
    np.testing.assert_allclose(split, whole, atol=1e-5, rtol=0)
    other_session, other_feed = evaluator.chip(seed=0, chip=4)
    assert np.abs(logits(other_session, x, other_feed) - whole).max() > 1e-3


def test_read_noise_changes_between_runs_of_one_chip(digits):
    model, x, _ = digits
    evaluator = MonteCarloEvaluator(model, parse_device("read:eta=0.05"))
    session, feed = evaluator.chip(seed=0, chip=0)
    assert np.abs(logits(session, x, feed) - logits(session, x, feed)).max() > 1e-4


def test_programmed_weights_follow_the_device_reference(digits):
    model, _, _ = digits
    device = parse_device("quantize:levels=33+lognormal:sigma=0.4+stuck:p_off=0.02,p_on=0.01")
    evaluator = MonteCarloEvaluator(model, device)
    program, _ = split_programming(evaluator.varied_model, "image")
    feed = evaluator.chip_feed(seed=7, chip=2)
    programmed = dict(zip([o.name for o in program.graph.output], evaluator.program_session.run(None, feed)))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for layer in analog_layers(model):
        expected = weights[layer.weight]
        w_range = np.abs(expected).max()
        for device_model in device.default:
            noise = feed.get(f"{layer.node}.{device_model.kind}_noise")
            expected = device_model.apply(expected, w_range, noise)
        np.testing.assert_allclose(programmed[f"{layer.node}.programmed_weight"], expected, atol=1e-6, rtol=1e-6)


def test_same_seed_same_numbers_and_chip_k_independent_of_sample_count(digits):
    model, x, y = digits
    evaluator = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0.6"), batch_size=32)
    first = evaluator.chip_accuracies(x, y, samples=4, seed=11, progress=False)
    again = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0.6")).chip_accuracies(x, y, 4, 11, progress=False)
    assert first == again
    assert evaluator.chip_accuracies(x, y, samples=2, seed=11, progress=False) == first[:2]
    assert evaluator.chip_accuracies(x, y, samples=4, seed=12, progress=False) != first
    assert len(set(first)) > 1


def test_sigma_zero_chips_equal_clean_and_variation_costs_accuracy(digits):
    model, x, y = digits
    exact = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0")).evaluate(x, y, 3, 0, progress=False)
    assert exact.chip_accuracies == [exact.clean_accuracy] * 3
    assert exact.yield_ == 1.0
    varied = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0.8")).evaluate(x, y, 8, 0, progress=False)
    assert varied.mean < exact.clean_accuracy - 0.02


def test_a_device_that_varies_nothing_is_measured_on_one_chip(digits, monkeypatch):
    model, x, y = digits
    evaluator = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0"))
    measured = []
    original = evaluator.chip_accuracy
    monkeypatch.setattr(evaluator, "chip_accuracy", lambda *args: measured.append(args[3]) or original(*args))
    assert evaluator.chip_accuracies(x, y, 50, 0, progress=False) == [evaluator.clean_accuracy(x, y)] * 50
    assert measured == [0]


def test_chip_stats_summary():
    stats = ChipStats(0.9, [0.9, 0.86, 0.5, 0.8])
    assert stats.worst == 0.5
    assert stats.mean == pytest.approx(0.765)
    assert stats.yield_ == 0.5  # 0.9 and 0.86 keep >= 95% of 0.9 = 0.855
    assert stats.p5 == pytest.approx(np.percentile([0.9, 0.86, 0.5, 0.8], 5))
    assert stats.summary()["chips"] == 4


def test_importing_the_evaluator_leaves_torch_unloaded():
    """Evaluation runs on onnxruntime alone; torch would add seconds to every evaluate run."""
    code = "import rrcompile.evaluate, sys; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_sessions_use_onnxruntime_cuda_when_present_else_the_torch_executor(digits, monkeypatch):
    """The routing of make_session, checked without a GPU: the GPU is stubbed, the sessions recorded."""
    import rrcompile.torch_graph as torch_graph
    from rrcompile import evaluate

    model, _, _ = digits
    built = []
    monkeypatch.setattr(torch_graph, "default_device", lambda device_type: torch_graph.torch.device("cuda"))
    monkeypatch.setattr(torch_graph, "TorchSession", lambda m, target: built.append(("torch", target.type)))
    monkeypatch.setattr(evaluate.ort, "InferenceSession", lambda data, options, providers: built.append(providers))
    monkeypatch.setattr(evaluate.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    evaluate.make_session(model, "cuda")
    monkeypatch.setattr(evaluate.ort, "get_available_providers", lambda: [evaluate.CUDA_PROVIDER, "CPUExecutionProvider"])
    evaluate.make_session(model, "auto")
    evaluate.make_session(model, "cpu")
    assert built == [("torch", "cuda"), [evaluate.CUDA_PROVIDER, "CPUExecutionProvider"], ["CPUExecutionProvider"]]
