"""Lipschitz penalties: zero exactly where they should be, and power iteration agrees with the SVD."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rrcompile.graph import AnalogLayer
from rrcompile.lipschitz import LipschitzPenalty, SpectralReport, orthogonality_penalty, spectral_norm, weight_matrix

CONV = AnalogLayer("conv", "Conv", "conv.w", None, (4, 2, 3, 3), rows=18, cols=4)
GEMM_T = AnalogLayer("fc", "Gemm", "fc.w", None, (5, 7), rows=7, cols=5)  # transB=1: [out, in]
MATMUL = AnalogLayer("mm", "MatMul", "mm.w", None, (7, 5), rows=7, cols=5)  # [in, out]


def orthonormal_rows(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(cols, rows, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q.T  # rows x cols with orthonormal rows


def test_weight_matrix_is_out_by_in_for_every_op():
    assert weight_matrix(CONV, torch.zeros(4, 2, 3, 3)).shape == (4, 18)
    assert weight_matrix(GEMM_T, torch.zeros(5, 7)).shape == (5, 7)
    w = torch.arange(35.0).reshape(7, 5)
    assert torch.equal(weight_matrix(MATMUL, w), w.T)


@pytest.mark.parametrize("shape", [(4, 18), (18, 4), (6, 6)])
def test_orthogonality_penalty_is_zero_for_orthonormal_and_positive_otherwise(shape):
    rows, cols = shape
    q = orthonormal_rows(min(shape), max(shape))
    matrix = q if rows <= cols else q.T
    assert float(orthogonality_penalty(matrix)) == pytest.approx(0.0, abs=1e-20)
    assert float(orthogonality_penalty(1.1 * matrix)) > 1e-3
    assert float(orthogonality_penalty(matrix + 0.01 * torch.randn(shape, dtype=torch.float64))) > 0


def test_spectral_hinge_is_zero_at_or_below_target_and_positive_above():
    q = orthonormal_rows(5, 7).float()
    penalty = LipschitzPenalty(beta=2.0, form="spectral", iterations=50)
    assert float(penalty([(GEMM_T, 0.9 * q)])) == pytest.approx(0.0, abs=1e-6)
    assert float(penalty([(GEMM_T, 1.5 * q)])) == pytest.approx(2.0 * 0.5 ** 2, rel=1e-4)


def test_penalty_gradient_pulls_the_norm_down():
    weight = (3 * torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(1))).requires_grad_()
    for form in ("orthogonal", "spectral"):
        penalty = LipschitzPenalty(beta=1.0, form=form)
        before = SpectralReport.of([(CONV, weight.detach())]).norms["conv"]
        (grad,) = torch.autograd.grad(penalty([(CONV, weight)]), weight)
        after = SpectralReport.of([(CONV, (weight - 1e-3 * grad).detach())]).norms["conv"]
        assert after < before


def test_power_iteration_matches_svd_and_report_multiplies_layers():
    rng = np.random.default_rng(3)
    conv_w, gemm_w = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((5, 7))
    report = SpectralReport.of([(CONV, conv_w), (GEMM_T, gemm_w)])
    exact = [np.linalg.norm(conv_w.reshape(4, -1), 2), np.linalg.norm(gemm_w, 2)]
    assert list(report.norms.values()) == pytest.approx(exact, rel=1e-6)
    assert report.product == pytest.approx(exact[0] * exact[1], rel=1e-6)
    value, _ = spectral_norm(torch.as_tensor(gemm_w), iterations=200)
    assert float(value) == pytest.approx(exact[1], rel=1e-9)


def test_unknown_form_is_rejected():
    with pytest.raises(ValueError, match="unknown Lipschitz penalty form"):
        LipschitzPenalty(beta=1.0, form="frobenius")
