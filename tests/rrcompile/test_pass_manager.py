"""PassManager: runs passes in order, repeats to a fixed point, and names the pass that failed."""
from __future__ import annotations

import onnx
import pytest

from rrcompile.errors import PassError, UnsupportedModelError
from rrcompile.pass_manager import Pass, PassManager, PassResult


class CountingPass(Pass):
    def __init__(self, changes: int):
        self.changes, self.calls = changes, 0

    def call(self, model):
        self.calls += 1
        return PassResult(model, self.calls <= self.changes)


class BrokenPass(Pass):
    def call(self, model):
        raise ZeroDivisionError("division by zero")


class RejectingPass(Pass):
    def requires(self, model):
        raise UnsupportedModelError("needs a Conv")

    def call(self, model):
        return PassResult(model, False)


def test_repeats_until_nothing_changes():
    counting = CountingPass(changes=2)
    result = PassManager([counting], steps=10)(onnx.ModelProto())
    assert result.modified and counting.calls == 3


def test_failure_names_the_pass_and_keeps_the_error_type():
    with pytest.raises(PassError, match=r"^BrokenPass failed: ZeroDivisionError: division by zero"):
        PassManager([CountingPass(0), BrokenPass()])(onnx.ModelProto())
    with pytest.raises(UnsupportedModelError, match=r"^RejectingPass: needs a Conv"):
        PassManager([RejectingPass()])(onnx.ModelProto())
