"""The REINFORCE agent on a small environment with an exhaustive answer."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, with_up_weights

from rrcompile.data import load_data
from rrcompile.devices import parse_device
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.rl.environment import CompensationEnv
from rrcompile.rl.reinforce import EPISODES, Reinforce


@pytest.fixture(scope="module")
def env():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    compensated = with_up_weights(InsertCompensationCandidatesPass(budget=0.05)(model).model, seed=3)
    data = load_data("digits").subset(200)
    return CompensationEnv(compensated, parse_device("lognormal:sigma=0.5"), data.x / np.float32(255), data.y,
                           chips=3, seed=1, overhead_weight=0.5)


def test_reinforce_is_seeded_and_returns_the_best_configuration_it_saw(env):
    agent = Reinforce(episodes=25, seed=4, progress=False)
    result = agent.select(env, budget=1.0)
    assert result == agent.select(env, budget=1.0)
    assert len(result.rewards) == 25
    assert result.reward == pytest.approx(max(result.rewards))
    assert result.reward == pytest.approx(env.reward(result.keep))
    assert result.kept_layers == [c.layer for c, k in zip(env.candidates, result.keep) if k]


def test_reinforce_reaches_the_exhaustive_optimum_of_a_small_space(env):
    best = max(env.reward(keep) for keep in itertools.product([0, 1], repeat=env.steps))
    assert Reinforce(EPISODES, seed=0, progress=False).select(env, budget=1.0).reward == pytest.approx(best)
