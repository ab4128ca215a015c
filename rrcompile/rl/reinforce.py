"""The selection agent: REINFORCE with a moving-average baseline, and the greedy comparison.

Why REINFORCE: the decision at each candidate is binary and the reward arrives once per episode,
so a stochastic policy over discrete actions trained by the score-function gradient fits the
problem directly. DDPG (the choice of AMC-style compression agents) needs a continuous action and
a learned critic, which a few dozen to a few hundred episodes cannot train reliably; the
moving-average baseline gives REINFORCE the variance reduction a critic would. The policy is a
small MLP from a candidate's state (``environment.FEATURES``) to the probability of keeping it.

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
    keep: tuple[int, ...]  # 1 = keep, per candidate in the environment's order
    reward: float
    accuracy: float
    overhead: float
    rewards: list[float]  # per episode
    layers: tuple[str, ...]  # the candidates' layers, in that order

    @property
    def kept_layers(self) -> list[str]:
        return [layer for layer, k in zip(self.layers, self.keep) if k]


def _result(env: CompensationEnv, keep: Sequence[int], rewards: list[float]) -> SearchResult:
    keep = tuple(int(k) for k in keep)
    return SearchResult(keep, env.reward(keep), env.accuracy(keep), env.overhead(keep), rewards,
                        tuple(c.layer for c in env.candidates))


def reinforce(env: CompensationEnv, *, episodes: int = 60, lr: float = 0.05, seed: int = 0,
              baseline_decay: float = 0.8, progress: bool = True) -> SearchResult:
    """Train a keep/drop policy for ``episodes`` episodes; return the best configuration seen."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = torch.optim.Adam(policy.parameters(), lr=lr)
    baseline, best, rewards = None, None, []
    bar = tqdm(range(episodes), desc="RL episodes", unit="ep", disable=not progress, leave=False)
    for _ in bar:
        keep, log_probs = [], []
        for step in range(env.steps):
            p_keep = torch.sigmoid(policy(torch.from_numpy(env.state(step, keep + [0] * (env.steps - step)))))[0]
            action = int(torch.rand((), generator=generator) < p_keep)
            log_probs.append(torch.log(p_keep if action else 1 - p_keep).clamp_min(-20))
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
    """Keep the most sensitive layers' candidates first while the overhead stays within ``max_overhead``."""
    keep = [0] * env.steps
    for step in sorted(range(env.steps), key=lambda s: -env.profiles[s].sensitivity):
        trial = keep.copy()
        trial[step] = 1
        if env.overhead(trial) <= max_overhead + 1e-12:
            keep = trial
    return _result(env, keep, [])


def fixed(env: CompensationEnv, keep_all: bool) -> SearchResult:
    """No compensation, or every candidate."""
    return _result(env, [int(keep_all)] * env.steps, [])
