"""Chip executors: in-process and Ray give the same results chip for chip, in chip order."""
from __future__ import annotations

import pickle
import sys

import onnx
import pytest
from conftest import DIGITS_MODEL

from rrcompile.calibrate import CalibratedEvaluator
from rrcompile.data import Preprocess, load_data
from rrcompile.devices import parse_device
from rrcompile.errors import OptionError
from rrcompile.evaluate import MonteCarloEvaluator, sigma_sweep
from rrcompile.executor import IN_PROCESS, RAY_MISSING, InProcess, RayExecutor, chip_executor
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.rl.environment import CalibrationEnv

DEVICE = parse_device("lognormal:sigma=0.5")


@pytest.fixture(scope="module")
def digits():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    data = load_data("digits", "test").subset(150)
    return model, Preprocess.parse("255", "0", "1").apply(data.x), data.y


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): the Ray executor is untested")
    with RayExecutor(workers=2) as executor:
        yield executor


def test_in_process_keeps_chip_order_and_starts_nothing():
    assert chip_executor() is IN_PROCESS
    assert InProcess().map_chips(lambda chip: chip * chip, [3, 1, 2], progress=False) == [9, 1, 4]


def test_an_evaluator_pickles_as_its_recipe_and_gives_the_same_chips(digits):
    model, x, y = digits
    evaluator = MonteCarloEvaluator(model, DEVICE, batch_size=64)
    again = pickle.loads(pickle.dumps(evaluator))
    assert again.batch_size == 64
    assert again.chip_accuracies(x, y, 3, 5, progress=False) == evaluator.chip_accuracies(x, y, 3, 5, progress=False)


def test_ray_workers_give_the_in_process_results_chip_for_chip(digits, ray_executor):
    model, x, y = digits
    assert ray_executor.workers == 2
    evaluator = MonteCarloEvaluator(model, DEVICE)
    here = evaluator.chip_accuracies(x, y, 6, 3, progress=False)
    assert len(set(here)) > 1  # distinct chips, so an order mix-up would show
    assert evaluator.chip_accuracies(x, y, 6, 3, progress=False, executor=ray_executor) == here
    sweep_here = sigma_sweep(model, DEVICE, [0.0, 0.4], x, y, 3, 1, progress=False)
    sweep_ray = sigma_sweep(model, DEVICE, [0.0, 0.4], x, y, 3, 1, progress=False, executor=ray_executor)
    assert {s: r.chip_accuracies for s, r in sweep_ray.items()} == {s: r.chip_accuracies for s, r in sweep_here.items()}


def test_ray_workers_calibrate_the_same_chips_as_in_process(digits, ray_executor):
    model, x, y = digits
    slotted = InsertCompensationCandidatesPass(ranks={}, calibrated=True)(model).model
    evaluator = CalibratedEvaluator(slotted, DEVICE, x[:64])
    raw, calibrated = evaluator.evaluate(x, y, 4, 0, progress=False)
    raw_ray, calibrated_ray = evaluator.evaluate(x, y, 4, 0, progress=False, executor=ray_executor)
    assert (raw_ray.chip_accuracies, calibrated_ray.chip_accuracies) == (raw.chip_accuracies, calibrated.chip_accuracies)


def test_ray_workers_profile_the_agents_layers_as_in_process(digits, ray_executor):
    model, x, y = digits
    slotted = InsertCompensationCandidatesPass(ranks={"conv1": 2, "fc2": 1}, calibrated=True)(model).model
    here, ray = (CalibrationEnv(slotted, DEVICE, x[:32], x, y, chips=3, executor=executor).profiles
                 for executor in (IN_PROCESS, ray_executor))
    assert any(p.sensitivity != 0 for p in here)
    assert ray == here


def test_without_ray_installed_asking_for_it_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if it were not installed
    with pytest.raises(OptionError, match=r"pip install -e '\.\[ray\]'") as error:
        chip_executor(workers=2)
    assert str(error.value) == RAY_MISSING and "\n" not in RAY_MISSING
