"""The selection agent: REINFORCE with a moving-average baseline, and the greedy comparison.

Why REINFORCE: the decision at each candidate is discrete (keep or drop; or a calibration slot's
rank among a few levels) and the reward arrives once per episode, so a stochastic policy over
discrete actions trained by the score-function gradient fits the problem directly. DDPG (the choice of AMC-style compression agents) needs a continuous action and
a learned critic, which a few dozen to a few hundred episodes cannot train reliably; the
moving-average baseline gives REINFORCE the variance reduction a critic would. The policy is a
small MLP from a candidate's state (``environment.FEATURES``) to logits over its options (the
environment's ``options(step)``; logits past the options the remaining budget affords are masked
out, so no episode is spent on a configuration over budget).

Exploration is the policy's own sampling; the best configuration seen in any episode is returned,
since every reward is exact for the fixed validation chips.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from tqdm import tqdm

from rrcompile.rl.environment import FEATURES, CompensationEnv


@dataclasses.dataclass
class SearchResult:
    keep: tuple[int, ...]  # the option chosen per candidate, in the environment's order (0: spend nothing)
    reward: float
    accuracy: float
    overhead: float
    rewards: list[float]  # per episode
    layers: tuple[str, ...]  # the candidates' layers, in that order
    values: tuple[int, ...] = ()  # what each chosen option means (kept 0/1, or a slot's rank)

    @property
    def kept_layers(self) -> list[str]:
        return [layer for layer, k in zip(self.layers, self.keep) if k]


def _result(env: CompensationEnv, keep: Sequence[int], rewards: list[float]) -> SearchResult:
    keep = tuple(int(k) for k in keep)
    return SearchResult(keep, env.reward(keep), env.accuracy(keep), env.overhead(keep), rewards,
                        tuple(c.layer for c in env.candidates), tuple(env.value(s, k) for s, k in enumerate(keep)))


def reinforce(env: CompensationEnv, *, episodes: int = 60, lr: float = 0.05, seed: int = 0,
              baseline_decay: float = 0.8, progress: bool = True) -> SearchResult:
    """Train a policy over each step's options (keep/drop, or a slot's rank) for ``episodes``
    episodes; return the best configuration seen."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if not env.steps:  # nothing to choose
        return fixed(env, keep_all=False)
    widest = max(env.options(step) for step in range(env.steps))
    policy = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 16), torch.nn.Tanh(), torch.nn.Linear(16, widest))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    baseline, best, rewards = None, None, []
    bar = tqdm(range(episodes), desc="RL episodes", unit="ep", disable=not progress, leave=False)
    for _ in bar:
        keep, log_probs = [], []
        for step in range(env.steps):
            # the agent only chooses among what the budget still allows: every episode is a valid configuration
            logits = policy(torch.from_numpy(env.state(step, keep + [0] * (env.steps - step))))[:env.affordable(step, keep)]
            probabilities = torch.softmax(logits, dim=0)
            action = int(torch.multinomial(probabilities, 1, generator=generator))
            log_probs.append(torch.log(probabilities[action]).clamp_min(-20))
            keep.append(action)
        reward = env.reward(keep)
        rewards.append(reward)
        if best is None or reward > env.reward(best):
            best = list(keep)
        advantage = 0.0 if baseline is None else reward - baseline
        baseline = reward if baseline is None else baseline_decay * baseline + (1 - baseline_decay) * reward
        loss = -advantage * torch.stack(log_probs).sum() * 100  # rewards are fractions: scale to points
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        bar.set_postfix(reward=f"{reward:.4f}", best=f"{env.reward(best):.4f}")
    return _result(env, best, rewards)


def greedy_by_sensitivity(env: CompensationEnv, max_overhead: float) -> SearchResult:
    """The most sensitive layers first, each given its largest option that keeps the overhead
    within ``max_overhead``."""
    keep = [0] * env.steps
    for step in sorted(range(env.steps), key=lambda s: -env.profiles[s].sensitivity):
        for option in reversed(range(1, env.options(step))):
            trial = keep.copy()
            trial[step] = option
            if env.overhead(trial) <= max_overhead + 1e-12:
                keep = trial
                break
    return _result(env, keep, [])


def fixed(env: CompensationEnv, keep_all: bool) -> SearchResult:
    """Every candidate at option 0 (nothing spent), or at its largest option."""
    return _result(env, [env.options(step) - 1 if keep_all else 0 for step in range(env.steps)], [])
