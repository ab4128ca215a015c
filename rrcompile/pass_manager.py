"""Pass infrastructure: a pass maps a ModelProto to a :class:`PassResult`; a manager runs a sequence.

Modelled on onnx-ir's passes (``call`` / ``requires`` / ``ensures``, a declared in-place or
functional contract that ``__call__`` enforces) and torch.fx's pass manager (a failure names the
pass that failed, an optional check after each pass). Passes take and return ``onnx.ModelProto``
so that any pass can use onnx-graphsurgeon, the onnx helpers or onnxruntime internally without the
others caring.

Whatever a pass declares, calling it never changes the caller's model: the compiler keeps the
models it started from (the original for the report, the canonical one for the evaluator).

Each pass run is logged at DEBUG level on the ``rrcompile.passes`` logger: its name, whether it
modified the model, and its seconds.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import time
from typing import Callable, ClassVar, Sequence

import onnx

from rrcompile.errors import PassError, RRCompileError

logger = logging.getLogger("rrcompile.passes")


@dataclasses.dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool


class Pass(abc.ABC):
    """A graph transformation. Subclasses implement :meth:`call` and may check invariants.

    ``in_place`` declares what :meth:`call` does with the model it is given:

    - ``True``: it edits that model and returns it. ``__call__`` hands it a copy, and gives the
      caller back its own model when nothing was modified.
    - ``False`` (functional): it leaves that model alone and returns a new one, or the same one
      unmodified.
    """

    in_place: ClassVar[bool] = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def fail(self, message: str) -> PassError:
        """A :class:`PassError` whose message starts with this pass's name; ``raise self.fail(...)``."""
        return PassError(f"{self.name}: {message}")

    def requires(self, model: onnx.ModelProto) -> None:
        """Raise :class:`PassError` if ``model`` is not in a form this pass accepts."""

    def ensures(self, model: onnx.ModelProto) -> None:
        """Raise :class:`PassError` if the pass left ``model`` in a broken state."""

    @abc.abstractmethod
    def call(self, model: onnx.ModelProto) -> PassResult:
        ...

    def __call__(self, model: onnx.ModelProto) -> PassResult:
        started = time.perf_counter()
        self.requires(model)
        given = model
        if self.in_place:
            given = onnx.ModelProto()
            given.CopyFrom(model)
        result = self.call(given)
        if not isinstance(result, PassResult) or not isinstance(result.model, onnx.ModelProto):
            got = type(result.model if isinstance(result, PassResult) else result).__name__
            raise self.fail(f"call returned a {got}, not a PassResult holding a ModelProto")
        if self.in_place and result.model is not given:
            raise self.fail("an in-place pass must return the model it was given")
        if not self.in_place and result.modified and result.model is model:
            raise self.fail("a functional pass must return a new model when it modifies one (it changed its input)")
        if self.in_place and not result.modified:
            result = PassResult(model, False)
        self.ensures(result.model)
        logger.debug("%s: modified=%s, %.3f s", self.name, result.modified, time.perf_counter() - started)
        return result


class PassManager(Pass):
    """Run passes in order, optionally repeating the sequence until nothing changes.

    An :class:`RRCompileError` raised inside a pass is re-raised with the same type and a message
    that starts with the failing pass's name, so a user knows which stage rejected the model; any
    other exception becomes a :class:`PassError` naming the pass. A subclass (a named pipeline
    such as CanonicalizePass) puts its own name in front, so an error from a nested pass reads
    ``CanonicalizePass > FoldConstantsPass failed: ...``; a plain PassManager adds nothing.

    ``check``, if given, runs on the model after each of this manager's passes (a nested manager
    counts as one pass), e.g. ``onnx.checker.check_model``; an exception from it is a
    :class:`PassError` naming the pass whose result failed.
    """

    def __init__(self, passes: Sequence[Pass], *, steps: int = 1,
                 check: Callable[[onnx.ModelProto], object] | None = None):
        self.passes = list(passes)
        self.steps = steps
        self.check = check

    def call(self, model: onnx.ModelProto) -> PassResult:
        modified_any = False
        for _ in range(self.steps):
            modified_step = False
            for p in self.passes:
                try:
                    result = self._run(p, model)
                except RRCompileError as exc:
                    if type(self) is PassManager:
                        raise
                    raise type(exc)(f"{self.name} > {exc}") from exc
                model = result.model
                modified_step |= result.modified
            modified_any |= modified_step
            if not modified_step:
                break
        return PassResult(model, modified_any)

    def _run(self, p: Pass, model: onnx.ModelProto) -> PassResult:
        """``p(model)``, then the check; every error comes out as an RRCompileError naming ``p``."""
        try:
            result = p(model)
        except PassError:
            raise
        except RRCompileError as exc:  # keep the type callers catch, add the pass's name
            if isinstance(p, PassManager):  # a nested manager's errors name their pass already
                raise
            raise type(exc)(f"{p.name}: {exc}") from exc
        except Exception as exc:  # a bug or a library error: still name the pass
            raise PassError(f"{p.name} failed: {type(exc).__name__}: {exc}") from exc
        if self.check is not None:
            try:
                self.check(result.model)
            except Exception as exc:
                line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise PassError(f"{p.name}: its result fails the check: {line}") from exc
        return result
