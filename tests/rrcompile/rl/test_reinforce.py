"""The REINFORCE agent on a small environment with an exhaustive answer."""
from __future__ import annotations

import itertools

import pytest
from conftest import small_compensation_env

from rrcompile.rl.reinforce import EPISODES, Reinforce


@pytest.fixture(scope="module")
def env():
    return small_compensation_env()


def test_reinforce_is_seeded_and_returns_the_best_configuration_it_saw(env):
    agent = Reinforce(episodes=25, seed=4, progress=False, refine=False)
    result = agent.select(env, budget=1.0)
    assert result == agent.select(env, budget=1.0)
    assert len(result.rewards) == 25
    assert result.reward == pytest.approx(max(result.rewards))
    assert result.reward == pytest.approx(env.reward(result.values))
    assert result.kept_layers == [c.layer for c, kept in zip(env.candidates, result.values) if kept]


def test_reinforce_reaches_the_exhaustive_optimum_of_a_small_space(env):
    best = max(env.reward(keep) for keep in itertools.product([0, 1], repeat=env.steps))
    assert Reinforce(EPISODES, seed=0, progress=False).select(env, budget=1.0).reward == pytest.approx(best)
