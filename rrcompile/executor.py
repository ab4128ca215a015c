"""Where independent chips run: in this process (the default), or on Ray workers.

Chip ``k`` of seed ``s`` is fully determined by ``(s, k)`` (``rrcompile.evaluate.draw_chip``), so
the chips of a Monte Carlo run are independent work items. Every caller that evaluates or
calibrates chip after chip goes through one function, ``executor.map_chips(fn, chips)``: ``fn(chip)``
is a picklable callable that holds the model and the data (a ``functools.partial`` over an
evaluator's method), and the results come back in the order of ``chips``, whoever computed them.

- :class:`InProcess` calls ``fn`` on each chip in turn, here; Ray is never imported.
- :class:`RayExecutor` runs on Ray (https://docs.ray.io), the engine rather than a home-made
  process pool: a local instance with ``workers`` CPUs, or an existing cluster at ``address``.
  Each map puts ``fn`` in Ray's object store once (``ray.put``: the model and the data travel
  once, numpy arrays zero-copy to workers on the same node), every worker actor loads it once (an
  evaluator pickles as its recipe and builds its onnxruntime sessions on the worker), and then the
  chips are handed out one at a time to whichever worker is free. A worker computes a chip with
  the same code and draws as this process, so the results are the same chip for chip for any
  number of workers (``tests/rrcompile/test_executor.py`` checks it with 2).

Ray is an optional extra (``pip install -e '.[ray]'``); asking for it without it installed is a
one-line :class:`~rrcompile.errors.OptionError`.
"""
from __future__ import annotations

import abc
import logging
from typing import Any, Callable, Sequence

from tqdm import tqdm

from rrcompile.errors import OptionError

RAY_MISSING = "Ray is not installed: pip install -e '.[ray]' (or run without --workers and --ray-address)"


class ChipExecutor(abc.ABC):
    """Runs ``fn`` on every chip of ``chips`` and returns the results in the order of ``chips``."""

    @abc.abstractmethod
    def map_chips(self, fn: Callable[[int], Any], chips: Sequence[int], *, progress: bool = True,
                  desc: str = "chips") -> list:
        """``[fn(chip) for chip in chips]``, with a progress bar of chips done when ``progress``."""

    def close(self) -> None:
        """Release what the executor started."""

    def __enter__(self) -> "ChipExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class InProcess(ChipExecutor):
    """Every chip in this process, one after another."""

    def map_chips(self, fn, chips, *, progress=True, desc="chips") -> list:
        return [fn(chip) for chip in tqdm(chips, desc=desc, unit="chip", disable=not progress, leave=False)]


IN_PROCESS = InProcess()


class RayExecutor(ChipExecutor):
    """Chips on Ray worker actors: ``workers`` of them (default: one per CPU of the cluster).

    Without ``address``, starts a local Ray instance with ``workers`` CPUs; with it, joins the
    cluster there (``ray start --head`` on one machine, ``ray start --address=...`` on the others,
    rrcompile installed on each). Each worker takes one CPU and keeps onnxruntime and torch to
    one thread, so that workers share the cores instead of fighting over them.
    """

    def __init__(self, workers: int | None = None, address: str | None = None):
        try:
            import ray
        except ImportError:
            raise OptionError(RAY_MISSING) from None
        self._ray = ray
        # the driver shows progress; the workers' own output stays in Ray's session logs
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, logging_level=logging.WARNING)
        count = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        worker = ray.remote(num_cpus=1)(_Worker)
        self._actors = [worker.remote() for _ in range(count)]

    @property
    def workers(self) -> int:
        return len(self._actors)

    def map_chips(self, fn, chips, *, progress=True, desc="chips") -> list:
        ray = self._ray
        from ray.util import ActorPool

        shared = ray.put(fn)  # once per map; a task argument that is a reference is not copied again
        ray.get([actor.load.remote(shared) for actor in self._actors])
        results: list = [None] * len(chips)
        pool = ActorPool(self._actors)
        for index, chip in enumerate(chips):
            pool.submit(lambda actor, item: actor.run.remote(*item), (index, chip))
        with tqdm(total=len(chips), desc=desc, unit="chip", disable=not progress, leave=False) as bar:
            while pool.has_next():
                index, result = pool.get_next_unordered()
                results[index] = result
                bar.update()
        return results

    def close(self) -> None:
        if self._ray.is_initialized():
            self._ray.shutdown()


class _Worker:
    """A Ray actor: holds the ``fn`` of the current map, loaded once, and runs it on chips."""

    def __init__(self) -> None:
        from rrcompile.evaluate import use_threads

        use_threads(1)  # one CPU per worker (``num_cpus=1``)
        self._fn: Callable[[int], Any] | None = None

    def load(self, fn: Callable[[int], Any]) -> None:
        self._fn = fn

    def run(self, index: int, chip: int) -> tuple[int, Any]:
        return index, self._fn(chip)


def chip_executor(workers: int | None = None, address: str | None = None) -> ChipExecutor:
    """In-process without ``workers`` and ``address`` (nothing imported, nothing started); else Ray."""
    if workers is None and address is None:
        return IN_PROCESS
    return RayExecutor(workers, address)
