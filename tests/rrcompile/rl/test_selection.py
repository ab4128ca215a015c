"""The selection interface and the baselines compile compares the agent with."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, with_up_weights

from rrcompile.data import load_data
from rrcompile.devices import parse_device
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.rl.environment import CompensationEnv
from rrcompile.rl.reinforce import Reinforce
from rrcompile.rl.selection import Fixed, GreedyBySensitivity, SelectionStrategy, search_result


@pytest.fixture(scope="module")
def env():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    compensated = with_up_weights(InsertCompensationCandidatesPass(budget=0.05)(model).model, seed=3)
    data = load_data("digits").subset(200)
    return CompensationEnv(compensated, parse_device("lognormal:sigma=0.5"), data.x / np.float32(255), data.y,
                           chips=3, seed=1, overhead_weight=0.5)


def test_greedy_respects_the_budget_and_fixed_spends_nothing_or_everything(env):
    greedy = GreedyBySensitivity().select(env, budget=0.02)
    assert greedy.overhead <= 0.02
    assert Fixed(keep_all=False).select(env, budget=1.0).overhead == 0
    assert Fixed(keep_all=True).select(env, budget=1.0).keep == (1,) * env.steps


def test_every_strategy_has_a_name_and_scores_its_choice_in_the_environment(env):
    strategies: list[SelectionStrategy] = [Reinforce(episodes=3, progress=False), GreedyBySensitivity(),
                                           Fixed(keep_all=False), Fixed(keep_all=True)]
    assert [s.name for s in strategies] == ["rl", "greedy", "none", "all"]
    for strategy in strategies:
        result = strategy.select(env, budget=1.0)
        assert result == search_result(env, result.keep, result.rewards)
        assert result.layers == tuple(c.layer for c in env.candidates)
