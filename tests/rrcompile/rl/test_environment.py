"""The selection environment: deterministic rewards on fixed chips, gates as the only switch."""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, small_calibration_env, with_up_weights

from rrcompile.data import load_data
from rrcompile.devices import DeviceConfig, parse_device
from rrcompile.evaluate import MonteCarloEvaluator, session_accuracy
from rrcompile.executor import InProcess
from rrcompile.graph import analog_layers
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.pipeline import canonicalize
from rrcompile.rl.environment import FEATURES, OVERHEAD_TOLERANCE, RANK_FRACTIONS, CompensationEnv, _mean_chip_accuracy

DEVICE = "lognormal:sigma=0.5"


@pytest.fixture(scope="module")
def setup():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    compensated = with_up_weights(InsertCompensationCandidatesPass(budget=0.05)(model).model, seed=3)
    data = load_data("digits").subset(200)
    return model, compensated, data.x / np.float32(255), data.y


def test_reward_is_deterministic_for_a_seed_and_differs_across_configurations(setup):
    _, compensated, x, y = setup
    first = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=3, seed=5)
    second = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=3, seed=5)
    configs = list(itertools.product([0, 1], repeat=first.steps))
    rewards = [first.reward(keep) for keep in configs]
    assert rewards == [second.reward(keep) for keep in configs]
    assert len(set(rewards)) > 1


def test_all_gates_off_scores_the_uncompensated_model_on_the_same_chips(setup):
    model, compensated, x, y = setup
    env = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=3, seed=5, overhead_weight=2.0)
    plain = MonteCarloEvaluator(model, parse_device(DEVICE)).chip_accuracies(x, y, samples=3, seed=5, progress=False)
    off = (0,) * env.steps
    assert env.accuracy(off) == pytest.approx(float(np.mean(plain)), abs=1e-12)
    on = (1,) * env.steps
    assert 0 < env.overhead(on) <= 0.05 * 1.0001
    assert env.reward(on) == pytest.approx(env.accuracy(on) - 2.0 * env.overhead(on))


def test_profiles_and_states_describe_each_layer(setup):
    _, compensated, x, y = setup
    env = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=2)
    assert [p.layer for p in env.profiles] == ["conv1", "conv2", "fc1", "fc2"]
    assert all(p.feature_error > 0 and p.spectral_norm > 0 for p in env.profiles)
    assert [p.depth for p in env.profiles] == sorted(p.depth for p in env.profiles)
    state = env.state(2, [1, 1, 0, 0])
    assert state.shape == (len(FEATURES),) and np.isfinite(state).all()
    assert state[FEATURES.index("spent")] > 0 == env.state(0, [0, 0, 0, 0])[FEATURES.index("spent")]


def test_configurations_over_the_budget_score_below_every_valid_one(setup):
    _, compensated, x, y = setup
    env = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=2, max_overhead=0.01)
    configs = list(itertools.product([0, 1], repeat=env.steps))
    over = [keep for keep in configs if env.overhead(keep) > 0.01]
    assert over and all(env.reward(keep) == -1.0 for keep in over)
    assert all(env.reward(keep) > -1.0 for keep in configs if keep not in over)


def test_calibration_options_are_fractions_of_the_rank_the_budget_still_affords():
    env = small_calibration_env()
    assert env.width == len(RANK_FRACTIONS)
    assert [env.levels(step)[-1] for step in range(env.steps)] == [c.rank for c in env.candidates]
    chosen: list[int] = []
    for step in range(env.steps):
        choices = env.choices(step, chosen)
        assert len(choices) == env.width and choices == sorted(choices) and choices[0] == 0
        assert set(choices) <= set(env.levels(step))
        most = [*chosen, choices[-1], *[0] * (env.steps - step - 1)]
        assert env.overhead(most) <= env.max_overhead + OVERHEAD_TOLERANCE
        if choices[-1] < env.levels(step)[-1]:  # the budget, not the slot, set the top: one rank more is over it
            assert env.overhead([*most[:step], choices[-1] + 1, *most[step + 1:]]) > env.max_overhead
        chosen.append(choices[-1])
    assert env.reward(chosen) > -1.0  # every episode the agent can play is within the budget


def test_layer_sensitivities_are_those_of_the_slotted_network_with_every_gate_off():
    # profiles run on the network without its slots: a slot as inserted (gate off, gain 1, offset
    # 0, up 0) passes its layer's output on unchanged, so the numbers must be the same
    env = small_calibration_env()
    x, y, off = env.x, env.y, env.gates((0,) * env.steps)
    gated = MonteCarloEvaluator(env.model, env.device, fold_slots=False)
    clean = session_accuracy(gated.clean_session, gated.input_name, x, y, gated.batch_size, lambda: off)
    for profile in env.profiles:
        layer = next(layer for layer in analog_layers(env.model) if layer.node == profile.layer)
        alone = DeviceConfig([], {layer.node: env.device.for_layer(layer.node, layer.weight)})
        varied = _mean_chip_accuracy(MonteCarloEvaluator(env.model, alone, fold_slots=False), x, y, env.chips, env.seed, off)
        assert profile.sensitivity == clean - varied
    assert any(profile.sensitivity != 0 for profile in env.profiles)


class _CountingExecutor(InProcess):
    """In process, counting the chips it is handed."""

    def __init__(self):
        self.chips = 0

    def map_chips(self, fn, chips, *, progress=True, desc="chips") -> list:
        self.chips += len(chips)
        return super().map_chips(fn, chips, progress=progress, desc=desc)


def test_the_layer_profiles_chips_run_on_the_environments_executor(setup):
    _, compensated, x, y = setup
    executor = _CountingExecutor()
    env = CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=2, executor=executor)
    assert executor.chips == 2 * env.steps  # each candidate layer's sensitivity, over the chips
    assert env.profiles == CompensationEnv(compensated, parse_device(DEVICE), x, y, chips=2).profiles
