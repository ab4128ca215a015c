"""Selection strategies: who picks one option per compensation candidate (keep or drop a trained
branch; a calibration slot's rank), and the baselines compile compares the agent with.

A strategy sees the problem only through an environment (``rrcompile.rl.environment``:
``steps``, ``options(step)``, ``affordable``, ``state``, ``overhead(keep)``, ``reward(keep)``,
``profiles``) and returns a :class:`SearchResult` built by :func:`search_result`. A new agent is one
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


def search_result(env: CompensationEnv, keep: Sequence[int], rewards: list[float]) -> SearchResult:
    """The result of choosing ``keep`` in ``env``, scored there; ``rewards``: one per episode searched."""
    keep = tuple(int(k) for k in keep)
    return SearchResult(keep, env.reward(keep), env.accuracy(keep), env.overhead(keep), rewards,
                        tuple(c.layer for c in env.candidates), tuple(env.value(s, k) for s, k in enumerate(keep)))


class SelectionStrategy(Protocol):
    name: str  # its row in compile's selection table

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        """One option per step of ``env``, spending at most ``budget`` (a fraction of the analog
        weights; ``env.max_overhead`` already scores a configuration above it -1)."""
        ...


@dataclasses.dataclass(frozen=True)
class GreedyBySensitivity:
    """The most sensitive layers first, each given its largest option that keeps the overhead
    within the budget."""

    name: ClassVar[str] = "greedy"

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        keep = [0] * env.steps
        for step in sorted(range(env.steps), key=lambda s: -env.profiles[s].sensitivity):
            for option in reversed(range(1, env.options(step))):
                trial = keep.copy()
                trial[step] = option
                if env.overhead(trial) <= budget + OVERHEAD_TOLERANCE:
                    keep = trial
                    break
        return search_result(env, keep, [])


@dataclasses.dataclass(frozen=True)
class Fixed:
    """Every candidate at option 0 (nothing spent, ``keep_all=False``), or at its largest option."""

    keep_all: bool

    @property
    def name(self) -> str:
        return "all" if self.keep_all else "none"

    def select(self, env: CompensationEnv, budget: float) -> SearchResult:
        return search_result(env, [env.options(step) - 1 if self.keep_all else 0 for step in range(env.steps)], [])
