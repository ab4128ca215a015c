"""Selection strategies: who picks one option per compensation candidate (keep or drop a trained
branch; a calibration slot's rank), and the baselines compile compares the agent with.

A strategy sees the problem only through an environment (``rrcompile.rl.environment``:
``steps``, ``levels(step)``, ``choices(step, chosen)``, ``width``, ``state``, ``overhead(values)``,
``reward(values)``, ``profiles``) and returns a :class:`SearchResult` built by :func:`search_result`. A new agent is one
file: a class with a ``name`` (its row in compile's selection table) and ``select(env, budget)``,
passed as ``CompileOptions(strategy=...)``. ``Reinforce`` (``rrcompile.rl.reinforce``) is the
default agent; ``GreedyBySensitivity`` and ``Fixed`` here are the comparisons.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol, Sequence

from rrcompile.rl.environment import OVERHEAD_TOLERANCE, CompensationEnv


@dataclasses.dataclass
class SearchResult:
    values: tuple[int, ...]  # the value chosen per candidate (kept 1 or dropped 0; a slot's rank), in the env's order
    reward: float
    accuracy: float
    overhead: float
    rewards: list[float]  # per episode
    layers: tuple[str, ...]  # the candidates' layers, in that order

    @property
    def kept_layers(self) -> list[str]:
        return [layer for layer, value in zip(self.layers, self.values) if value]


def search_result(env: CompensationEnv, values: Sequence[int], rewards: list[float]) -> SearchResult:
    """The result of choosing ``values`` in ``env``, scored there; ``rewards``: one per episode searched."""
    values = tuple(int(v) for v in values)
    return SearchResult(values, env.reward(values), env.accuracy(values), env.overhead(values), rewards,
                        tuple(c.layer for c in env.candidates))


class SelectionStrategy(Protocol):
    name: str  # its row in compile's selection table

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        """One option per step of ``env``, spending at most ``budget`` (a fraction of the analog
        weights; ``env.max_overhead`` already scores a configuration above it -1)."""
        ...


def climb(env: CompensationEnv, start: Sequence[int], budget: float) -> tuple[int, ...]:
    """Spend what ``start`` leaves of ``budget``: raise one step by one level while that raises the
    reward, until no single step up fits the budget and scores higher. Up only, by measurement: a
    step down saves at most ``overhead_weight`` times one level's cost, and on LeNet-5 (sigma 0.5
    and 0.7) climbing both ways accepted no step down and cost 5 and 4 more configurations (of
    about 0.6 s each) to end where climbing up ended. Later steps are tried first: with calibration
    slots a move there reuses every earlier slot's solves."""
    best = [int(v) for v in start]
    improved = True
    while improved:
        improved = False
        for step in reversed(range(env.steps)):
            levels = env.levels(step)
            above = levels.index(best[step]) + 1
            if above == len(levels):
                continue
            trial = best.copy()
            trial[step] = levels[above]
            if env.overhead(trial) <= budget + OVERHEAD_TOLERANCE and env.reward(trial) > env.reward(best):
                best, improved = trial, True
    return tuple(best)


@dataclasses.dataclass(frozen=True)
class GreedyBySensitivity:
    """The most sensitive layers first, each given its largest level that keeps the overhead
    within the budget."""

    name: ClassVar[str] = "greedy"

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        values = [env.levels(step)[0] for step in range(env.steps)]
        for step in sorted(range(env.steps), key=lambda s: -env.profiles[s].sensitivity):
            for level in reversed(env.levels(step)[1:]):
                trial = values.copy()
                trial[step] = level
                if env.overhead(trial) <= budget + OVERHEAD_TOLERANCE:
                    values = trial
                    break
        return search_result(env, values, [])


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Every candidate at its cheapest level (nothing spent, ``keep_all=False``), or at its largest."""

    keep_all: bool

    @property
    def name(self) -> str:
        return "all" if self.keep_all else "none"

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        return search_result(env, [env.levels(step)[-1 if self.keep_all else 0] for step in range(env.steps)], [])
