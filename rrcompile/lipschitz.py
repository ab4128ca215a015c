"""Error suppression: Lipschitz-constant regularization of the analog layers (CorrectNet, part 1).

A weight deviation ``dW`` in layer ``l`` adds an error ``dW x`` to its output; every later layer
``k`` can amplify that error by up to its Lipschitz constant, the spectral norm ``||W_k||_2`` (ReLU
and pooling do not amplify). Keeping each layer's spectral norm near 1 keeps errors from growing
layer after layer. CorrectNet (arXiv 2211.14917, sec. III-A) adds such a term to the training loss
and calls it a "modified Lipschitz constant regularization"; the public text at hand (abstract
and summaries) does not give the exact form, so two standard forms are implemented:

1. ``orthogonal`` (Parseval networks, Cisse et al. 2017): ``beta * ||W W^T - I||_F^2`` on the
   smaller Gram matrix of the layer's weight matrix, zero iff its rows (or columns) are
   orthonormal, which pins every singular value, the largest included, at 1.
2. ``spectral``: a hinge on the spectral norm, ``beta * max(0, ||W||_2 - target)^2``, with
   ``||W||_2`` from power iteration (Miyato et al. 2018); it only pulls down layers that amplify.

``bench/suppression.py`` compared them on LeNet-5 / MNIST under log-normal sigma = 0.5 (100 chips,
3 epochs; the README's Results). Both bounded the product of the layers' spectral norms as
intended (36.5 down to 1.2-16.7), yet neither raised the Monte Carlo accuracy (89.2% before;
81.1-86.2% orthogonal, 84.9-87.5% spectral): a log-normal deviation is multiplicative, so its
error scales with the weights it perturbs, and smaller norms do not make it smaller relative to
the signal. The spectral hinge costs less (best 87.5% at beta = 0.01 against 86.2% for the best
orthogonal setting), so it is the default. Training on sampled chips (noise injection: 96.6%) is
what gains robustness; ``rrcompile compile`` fine-tunes with both.

The weight matrix of a layer is ``[out, in]``: Gemm/MatMul weights oriented so, conv kernels
reshaped to ``[out, in * kh * kw]`` (the crossbar's matrix).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Literal

import numpy as np
import torch

from rrcompile.graph import AnalogLayer

FORMS = ("orthogonal", "spectral")
POWER_ITERATIONS = 100  # for reports; the training penalty warm-starts its vectors, so fewer suffice there


def weight_matrix(layer: AnalogLayer, weight: torch.Tensor) -> torch.Tensor:
    """The layer's weight as the ``[out, in]`` matrix a crossbar holds."""
    if layer.op == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if weight.shape == (layer.cols, layer.rows):  # Gemm with transB=1
        return weight
    return weight.reshape(layer.rows, layer.cols).T


def spectral_norm(matrix: torch.Tensor, iterations: int = POWER_ITERATIONS, start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(largest singular value, right singular vector) by power iteration on ``M^T M``.

    Differentiable in ``matrix`` through the last step (the vector is treated as a constant).
    """
    with torch.no_grad():
        if start is None:  # a fixed random start: a constant vector can be orthogonal to the top one
            generator = torch.Generator().manual_seed(0)
            start = torch.randn(matrix.shape[1], generator=generator, dtype=matrix.dtype).to(matrix.device)
        v = start
        for _ in range(iterations):
            v = matrix.T @ (matrix @ v)
            v = v / v.norm().clamp_min(1e-12)
    return (matrix @ v).norm(), v


def orthogonality_penalty(matrix: torch.Tensor) -> torch.Tensor:
    """``||G - I||_F^2`` with ``G`` the smaller of ``M M^T`` and ``M^T M`` (the one that can be I)."""
    gram = matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix
    return ((gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)) ** 2).sum()


@dataclasses.dataclass
class LipschitzPenalty:
    """The regularization term summed over analog layers: ``penalty(layers, weights)``."""

    beta: float
    form: Literal["orthogonal", "spectral"] = "spectral"
    target: float = 1.0  # spectral form: the largest spectral norm left unpenalized
    iterations: int = 3  # spectral form: power steps per training step, warm-started

    def __post_init__(self) -> None:
        if self.form not in FORMS:
            raise ValueError(f"unknown Lipschitz penalty form {self.form!r} (known: {', '.join(FORMS)})")
        self._vectors: dict[str, torch.Tensor] = {}

    def __call__(self, layers: Iterable[tuple[AnalogLayer, torch.Tensor]]) -> torch.Tensor:
        terms = []
        for layer, weight in layers:
            matrix = weight_matrix(layer, weight)
            if self.form == "orthogonal":
                terms.append(orthogonality_penalty(matrix))
            else:
                norm, self._vectors[layer.node] = spectral_norm(matrix, self.iterations, self._vectors.get(layer.node))
                terms.append(torch.relu(norm - self.target) ** 2)
        return self.beta * torch.stack(terms).sum()


@dataclasses.dataclass(frozen=True)
class SpectralReport:
    """Spectral norm of every analog layer's weight matrix, and their product over the network
    (an upper bound on how much the network can amplify an error in its input)."""

    norms: dict[str, float]

    @property
    def product(self) -> float:
        return float(np.prod(list(self.norms.values())))

    @classmethod
    def of(cls, layers: Iterable[tuple[AnalogLayer, torch.Tensor | np.ndarray]]) -> SpectralReport:
        norms = {}
        for layer, weight in layers:
            tensor = torch.from_numpy(np.array(weight)) if isinstance(weight, np.ndarray) else weight.detach()
            matrix = weight_matrix(layer, tensor.to(torch.float64))
            norms[layer.node] = float(spectral_norm(matrix)[0])
        return cls(norms)
