"""The selection interface and the baselines compile compares the agent with."""
from __future__ import annotations

import pytest
from conftest import small_compensation_env

from rrcompile.rl.reinforce import Reinforce
from rrcompile.rl.selection import Fixed, GreedyBySensitivity, SelectionStrategy, search_result


@pytest.fixture(scope="module")
def env():
    return small_compensation_env()


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
