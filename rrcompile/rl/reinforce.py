"""The default selection agent: REINFORCE with a moving-average baseline (the interface it
implements and the comparisons are in ``rrcompile.rl.selection``).

Why REINFORCE: the decision at each candidate is discrete (keep or drop; or a calibration slot's
rank among a few levels) and the reward arrives once per episode, so a stochastic policy over
discrete actions trained by the score-function gradient fits the problem directly. DDPG (the
choice of AMC-style compression agents) needs a continuous action and a learned critic, which a
few dozen to a few hundred episodes cannot train reliably; the moving-average baseline gives
REINFORCE the variance reduction a critic would. The policy is a
small MLP from a candidate's state (``environment.FEATURES``) to logits over its options (the
environment's ``options(step)``; logits past the options the remaining budget affords are masked
out, so no episode is spent on a configuration over budget).

Exploration is the policy's own sampling; the best configuration seen in any episode is returned,
since every reward is exact for the fixed validation chips.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from tqdm import tqdm

from rrcompile.rl.environment import FEATURES, CompensationEnv
from rrcompile.rl.selection import Fixed, SearchResult, search_result

EPISODES = 60  # compile's default (tests/rrcompile/rl: it finds the exhaustive optimum of 4 keep/drop steps)
LEARNING_RATE = 0.05  # the policy's Adam step
BASELINE_DECAY = 0.8  # the moving-average baseline's weight on its past
HIDDEN = 16  # the policy MLP's hidden units, from the len(FEATURES) numbers of a state
MIN_LOG_PROB = -20.0  # floor of an action's log-probability: one that underflows to 0 would make the loss infinite
REWARD_SCALE = 100  # rewards are fractions: the loss takes them in points


@dataclasses.dataclass(frozen=True)
class Reinforce:
    """Train a policy over each step's options (keep/drop, or a slot's rank) for ``episodes``
    episodes; select the best configuration seen."""

    episodes: int = EPISODES
    seed: int = 0
    lr: float = LEARNING_RATE
    baseline_decay: float = BASELINE_DECAY
    progress: bool = True

    name: ClassVar[str] = "rl"

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        """``budget`` is ``env.max_overhead``'s to enforce: every configuration above it scores -1."""
        generator = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        if not env.steps:  # nothing to choose
            return Fixed(keep_all=False).select(env, budget)
        widest = max(env.options(step) for step in range(env.steps))
        policy = torch.nn.Sequential(torch.nn.Linear(len(FEATURES), HIDDEN), torch.nn.Tanh(),
                                     torch.nn.Linear(HIDDEN, widest))
        optimizer = torch.optim.Adam(policy.parameters(), lr=self.lr)
        baseline, best, rewards = None, None, []
        bar = tqdm(range(self.episodes), desc="RL episodes", unit="ep", disable=not self.progress, leave=False)
        for _ in bar:
            keep, log_probs = [], []
            for step in range(env.steps):
                # the agent only chooses among what the budget still allows: every episode is a valid configuration
                logits = policy(torch.from_numpy(env.state(step, keep + [0] * (env.steps - step))))[:env.affordable(step, keep)]
                probabilities = torch.softmax(logits, dim=0)
                action = int(torch.multinomial(probabilities, 1, generator=generator))
                log_probs.append(torch.log(probabilities[action]).clamp_min(MIN_LOG_PROB))
                keep.append(action)
            reward = env.reward(keep)
            rewards.append(reward)
            if best is None or reward > env.reward(best):
                best = list(keep)
            advantage = 0.0 if baseline is None else reward - baseline
            baseline = reward if baseline is None else self.baseline_decay * baseline + (1 - self.baseline_decay) * reward
            loss = -advantage * torch.stack(log_probs).sum() * REWARD_SCALE
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(reward=f"{reward:.4f}", best=f"{env.reward(best):.4f}")
        return search_result(env, best, rewards)
