"""Pass infrastructure: a pass maps a ModelProto to a :class:`PassResult`; a manager runs a sequence.

Modelled on onnx-ir's passes (``call`` / ``requires`` / ``ensures``) and torch.fx's pass manager
(a failure names the pass that failed). Passes take and return ``onnx.ModelProto`` so that any pass
can use onnx-graphsurgeon, the onnx helpers or onnxruntime internally without the others caring.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Sequence

import onnx

from rrcompile.errors import PassError, RRCompileError


@dataclasses.dataclass(frozen=True)
class PassResult:
    model: onnx.ModelProto
    modified: bool


class Pass(abc.ABC):
    """A graph transformation. Subclasses implement :meth:`call` and may check invariants."""

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
        self.requires(model)
        result = self.call(model)
        self.ensures(result.model)
        return result


class PassManager(Pass):
    """Run passes in order, optionally repeating the sequence until nothing changes.

    An :class:`RRCompileError` raised inside a pass is re-raised with the same type and a message
    that starts with the failing pass's name, so a user knows which stage rejected the model; any
    other exception becomes a :class:`PassError` naming the pass.
    """

    def __init__(self, passes: Sequence[Pass], *, steps: int = 1):
        self.passes = list(passes)
        self.steps = steps

    def call(self, model: onnx.ModelProto) -> PassResult:
        modified_any = False
        for _ in range(self.steps):
            modified_step = False
            for p in self.passes:
                try:
                    result = p(model)
                except PassError:
                    raise
                except RRCompileError as exc:  # keep the type callers catch, add the pass's name
                    raise type(exc)(f"{p.name}: {exc}") from exc
                except Exception as exc:  # a bug or a library error: still name the pass
                    raise PassError(f"{p.name} failed: {type(exc).__name__}: {exc}") from exc
                model = result.model
                modified_step |= result.modified
            modified_any |= modified_step
            if not modified_step:
                break
        return PassResult(model, modified_any)
