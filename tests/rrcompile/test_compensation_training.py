"""Compensation training: only the branches learn, and they repair accuracy under variation."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL
from onnx import numpy_helper

from rrcompile.compensation_training import CompensationConfig, train_compensation
from rrcompile.compensation import candidates
from rrcompile.data import load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize

DEVICE = parse_device("lognormal:sigma=0.5")


@pytest.fixture(scope="module")
def trained():
    model = InsertCompensationCandidatesPass(budget=0.05)(canonicalize(onnx.load(str(DIGITS_MODEL)))).model
    train = load_data("digits", "train")
    result, history = train_compensation(model, DEVICE, train.x / np.float32(255), train.y,
                                         CompensationConfig(epochs=6, lr=3e-3, seed=0), progress=False)
    return model, result, history


def test_only_compensation_weights_change(trained):
    model, result, history = trained
    branch = {name for c in candidates(model) for name in (c.down, c.up)}
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert all(np.array_equal(before[name], after[name]) for name in before if name not in branch)
    assert all(np.abs(after[c.up]).max() > 0 for c in candidates(model))
    assert len(history) == 6


def test_trained_compensation_raises_accuracy_on_unseen_chips(trained):
    model, result, _ = trained
    test = load_data("digits", "test")
    x = test.x / np.float32(255)
    plain = MonteCarloEvaluator(model, DEVICE).evaluate(x, test.y, 10, seed=99, progress=False)
    compensated = MonteCarloEvaluator(result, DEVICE).evaluate(x, test.y, 10, seed=99, progress=False)
    assert compensated.clean_accuracy >= plain.clean_accuracy - 0.02
    assert compensated.mean > plain.mean + 0.02
