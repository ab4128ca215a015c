"""The selection interface and the baselines compile compares the agent with."""
from __future__ import annotations

import pytest
from conftest import small_calibration_env, small_compensation_env

from rrcompile.rl.environment import OVERHEAD_TOLERANCE
from rrcompile.rl.reinforce import Reinforce
from rrcompile.rl.selection import Fixed, GreedyBySensitivity, SelectionStrategy, climb, search_result


@pytest.fixture(scope="module")
def env():
    return small_compensation_env()


def test_greedy_respects_the_budget_and_fixed_spends_nothing_or_everything(env):
    greedy = GreedyBySensitivity().select(env, budget=0.02)
    assert greedy.overhead <= 0.02
    assert Fixed(keep_all=False).select(env, budget=1.0).overhead == 0
    assert Fixed(keep_all=True).select(env, budget=1.0).values == (1,) * env.steps


def test_every_strategy_has_a_name_and_scores_its_choice_in_the_environment(env):
    strategies: list[SelectionStrategy] = [Reinforce(episodes=3, progress=False), GreedyBySensitivity(),
                                           Fixed(keep_all=False), Fixed(keep_all=True)]
    assert [s.name for s in strategies] == ["rl", "greedy", "none", "all"]
    for strategy in strategies:
        result = strategy.select(env, budget=1.0)
        assert result == search_result(env, result.values, result.rewards)
        assert result.layers == tuple(c.layer for c in env.candidates)


@pytest.fixture(scope="module")
def calibration_env():
    return small_calibration_env()


def test_climb_spends_the_budget_while_one_level_up_somewhere_scores_higher(calibration_env):
    env = calibration_env
    start = tuple(env.levels(step)[0] for step in range(env.steps))
    climbed = climb(env, start, env.max_overhead)
    assert climbed != start and env.reward(climbed) > env.reward(start)
    assert env.overhead(climbed) <= env.max_overhead + OVERHEAD_TOLERANCE
    for step in range(env.steps):
        if climbed[step] < env.levels(step)[-1]:
            raised = [*climbed[:step], climbed[step] + 1, *climbed[step + 1:]]
            assert env.overhead(raised) > env.max_overhead + OVERHEAD_TOLERANCE or env.reward(raised) <= env.reward(climbed)


def test_reinforce_refines_the_best_configuration_it_saw(calibration_env):
    env = calibration_env
    seen = Reinforce(episodes=2, seed=0, progress=False, refine=False).select(env, env.max_overhead)
    refined = Reinforce(episodes=2, seed=0, progress=False).select(env, env.max_overhead)
    assert refined.rewards == seen.rewards
    assert refined.values == climb(env, seen.values, env.max_overhead) != seen.values
    assert refined.reward > seen.reward
