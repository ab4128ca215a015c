"""Pass contract (in place or functional, a PassResult back) and PassManager: runs passes in order,
repeats to a fixed point, checks after each pass, logs each, and names the pass that failed."""
from __future__ import annotations

import logging

import onnx
import pytest

from rrcompile.errors import PassError, UnsupportedModelError
from rrcompile.pass_manager import Pass, PassManager, PassResult


class CountingPass(Pass):
    in_place = True

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


class RenamingPass(Pass):
    """Edits the model it is given: the in-place contract."""

    in_place = True

    def call(self, model):
        model.graph.name = "renamed"
        return PassResult(model, True)


class SneakyPass(Pass):
    """Declared functional, yet edits its input: the contract catches it."""

    def call(self, model):
        model.graph.name = "renamed"
        return PassResult(model, True)


class WrongResultPass(Pass):
    def call(self, model):
        return model


class Pipeline(PassManager):
    def __init__(self, *passes):
        super().__init__(list(passes))


def named_model(name: str = "original") -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.graph.name = name
    return model


def test_an_in_place_pass_edits_a_copy_and_the_callers_model_stays():
    model = named_model()
    result = RenamingPass()(model)
    assert result.modified and result.model.graph.name == "renamed" and model.graph.name == "original"


def test_an_unmodified_in_place_pass_gives_back_the_callers_model():
    model = named_model()
    assert CountingPass(changes=0)(model).model is model


def test_a_functional_pass_that_edits_its_input_is_refused():
    with pytest.raises(PassError, match=r"^SneakyPass: a functional pass must return a new model"):
        SneakyPass()(named_model())


def test_call_must_return_a_pass_result_holding_a_model():
    with pytest.raises(PassError, match=r"^WrongResultPass: call returned a ModelProto, not a PassResult"):
        WrongResultPass()(named_model())


def test_the_check_runs_after_each_pass_and_names_the_pass_it_rejects():
    seen = []

    def check(model):
        seen.append(model.graph.name)
        if model.graph.name == "renamed":
            raise ValueError("bad name\nsecond line")

    with pytest.raises(PassError, match=r"^RenamingPass: its result fails the check: bad name$"):
        PassManager([CountingPass(0), RenamingPass()], check=check)(named_model())
    assert seen == ["original", "renamed"]


def test_a_named_manager_puts_its_name_before_the_failing_pass():
    with pytest.raises(PassError, match=r"^Pipeline > BrokenPass failed: ZeroDivisionError"):
        PassManager([Pipeline(PassManager([CountingPass(0), BrokenPass()]))])(onnx.ModelProto())
    with pytest.raises(UnsupportedModelError, match=r"^Pipeline > RejectingPass: needs a Conv"):
        Pipeline(RejectingPass())(onnx.ModelProto())


def test_each_pass_is_logged_with_modified_and_seconds(caplog):
    with caplog.at_level(logging.DEBUG, logger="rrcompile.passes"):
        Pipeline(RenamingPass(), CountingPass(0))(named_model())
    lines = [r.getMessage() for r in caplog.records if r.name == "rrcompile.passes"]
    assert [line.split(",")[0] for line in lines] == [
        "RenamingPass: modified=True", "CountingPass: modified=False", "Pipeline: modified=True"]
    assert all(line.endswith(" s") for line in lines)
