"""Model loading errors are one line naming the file; atomic writes leave nothing behind on failure;
a command's outputs are checked up front and replace their targets together or not at all."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
from graph_builders import QUIRK_MODELS
from onnx import numpy_helper

import rrcompile.io
from rrcompile.errors import ModelLoadError, OutputPathError
from rrcompile.io import OutputPlan, atomic_write, load_model, outputs, save_model


def test_missing_truncated_and_invalid_files(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.onnx: no such file"):
        load_model(tmp_path / "nope.onnx")
    good = save_model(QUIRK_MODELS["mlp_matmul_chain"]()[0], tmp_path / "good.onnx")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="truncated.onnx") as info:
        load_model(truncated)
    assert "\n" not in str(info.value)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_text("this is not a model")
    with pytest.raises(ModelLoadError, match="garbage.onnx"):
        load_model(garbage)
    assert load_model(good).graph.node


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_nan_or_inf_weight_is_refused_naming_the_initializer(tmp_path):
    model, _ = QUIRK_MODELS["mlp_matmul_chain"]()
    tensor = model.graph.initializer[0]
    array = numpy_helper.to_array(tensor).copy()
    array.flat[0] = np.inf
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    path = save_model(model, tmp_path / "inf.onnx")
    with pytest.raises(ModelLoadError, match=f"initializer '{tensor.name}' holds 1 NaN or Inf"):
        load_model(path)


def test_outputs_commit_together_at_the_end(tmp_path):
    old = tmp_path / "b.json"
    old.write_text("previous")
    with outputs([tmp_path / "in.onnx"], {"-o": tmp_path / "new" / "a.onnx", "--json": old, "--plot": None}) as plan:
        assert not (tmp_path / "new" / "a.onnx").exists()
        plan["-o"].write_text("model")
        plan["--json"].write_text("report")
        assert old.read_text() == "previous"
    assert (tmp_path / "new" / "a.onnx").read_text() == "model" and old.read_text() == "report"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.onnx", "b.json", "new"]


def test_outputs_leave_everything_as_found_on_error(tmp_path):
    old = tmp_path / "b.json"
    old.write_text("previous")
    with pytest.raises(KeyboardInterrupt):
        with outputs([], {"-o": tmp_path / "new" / "deeper" / "a.onnx", "--json": old}) as plan:
            plan["-o"].write_text("model")
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["b.json"] and old.read_text() == "previous"


def test_a_failed_commit_restores_the_outputs_already_in_place(tmp_path, monkeypatch):
    first, second = tmp_path / "a.onnx", tmp_path / "b.json"
    first.write_text("previous")
    replace = os.replace
    calls = []

    def failing_second(src, dst):
        calls.append(dst)
        if Path(dst) == second:
            raise PermissionError(13, "Permission denied", str(dst))
        replace(src, dst)

    monkeypatch.setattr(rrcompile.io.os, "replace", failing_second)
    with pytest.raises(OutputPathError, match="b.json: cannot be written"):
        with outputs([], {"-o": first, "--json": second}) as plan:
            plan["-o"].write_text("model")
            plan["--json"].write_text("report")
    assert first.read_text() == "previous" and not second.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["a.onnx"]


def test_outputs_never_hand_out_what_was_not_asked_for(tmp_path):
    with outputs([], {"-o": tmp_path / "a.onnx", "--json": tmp_path / "b.json"}) as plan:
        plan["-o"].write_text("model")
    assert [p.name for p in tmp_path.iterdir()] == ["a.onnx"]


@pytest.mark.parametrize("case, message", [
    ("directory", "--json {tmp}/sub: is a directory"),
    ("input", "would overwrite the input"),
    ("symlink to input", "would overwrite the input"),
    ("same as another output", "also the path of -o"),
    ("under a file", "cannot write there"),
    ("pipe", "not a regular file"),
])
def test_outputs_are_checked_before_any_work(tmp_path, case, message):
    model = tmp_path / "in.onnx"
    model.write_text("model")
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.onnx").symlink_to(model)
    os.mkfifo(tmp_path / "pipe")  # like /dev/null, which a rename as root would replace
    path = {"directory": tmp_path / "sub", "input": model, "symlink to input": tmp_path / "link.onnx",
            "same as another output": tmp_path / "sub" / ".." / "out.onnx", "under a file": model / "x.json",
            "pipe": tmp_path / "pipe"}[case]
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(OutputPathError, match=re.escape(message.format(tmp=tmp_path))) as info:
        OutputPlan([model], {"-o": tmp_path / "out.onnx", "--json": path})
    assert "\n" not in str(info.value)
    assert sorted(tmp_path.rglob("*")) == before
