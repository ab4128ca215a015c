"""Model loading errors are one line naming the file; atomic writes leave nothing behind on failure."""
from __future__ import annotations

import pytest
from graph_builders import QUIRK_MODELS

from rrcompile.errors import ModelLoadError
from rrcompile.io import atomic_write, load_model, save_model


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
