"""bench/scaling.py: its tiny setting runs every step and writes its JSON and plot; its ResNets export right."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import REPO, shared_path

SCRIPT = REPO / "bench" / "scaling.py"


def _scaling():
    spec = importlib.util.spec_from_file_location("scaling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.shared
def test_quick_run_compares_workers_and_measures_a_model(tmp_path):
    shared_path("models", "lenet5_mnist.onnx")
    shared_path("fashion-mnist")
    pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]'): the workers step needs it")
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--models", "lenet5-mnist", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "scaling.json").read_text())
    rows = report["workers"]["rows"]
    assert [r["run"] for r in rows] == ["in-process", "Ray, 1 worker", "Ray, 2 workers"]
    assert all(r["identical"] and r["chips_per_second"] > 0 for r in rows) and rows[0]["ratio"] == 1
    (lenet,) = report["models"]
    assert lenet["macs"] == 416_520 and lenet["compile_seconds"] > 0 and lenet["peak_rss_mib"] > 0
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vs in-process" in run.stdout and "MACs / sample" in run.stdout


def test_the_resnet20_export_has_batchnorm_and_residual_adds_and_runs_as_in_torch():
    scaling = _scaling()
    model = scaling.export_resnet("resnet20", (3, 32, 32))
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("Conv") == 21 and ops.count("BatchNormalization") == 21 and ops.count("Add") == 9
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    with torch.no_grad():
        expected = scaling._resnet("resnet20")(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, atol=1e-4, rtol=1e-4)
