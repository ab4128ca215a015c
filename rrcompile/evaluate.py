"""Monte Carlo evaluation: accuracy of a model over many simulated chips.

One sample is one chip: the per-chip noise tensors are drawn once from the chip's own generator,
``numpy.random.default_rng([seed, chip])``, and fed unchanged to every batch, so every image of a
sample sees the same programmed weights and chip ``k`` is the same chip whatever ``--samples`` is.
Read noise (per inference) comes from a second stream of the same chip, one draw per batch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from rrcompile.data import batches, fit_to_input
from rrcompile.devices import DeviceConfig, noise_inputs
from rrcompile.errors import UnsupportedModelError
from rrcompile.passes.insert_variation import InsertVariationPass

YIELD_FRACTION = 0.95  # a chip "yields" if it keeps this fraction of the clean accuracy


def make_session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # the noise inputs are unused at sigma = 0 ops; keep ORT quiet
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def model_io(model: onnx.ModelProto) -> tuple[str, list[int | str]]:
    """Name and shape of a classifier's single data input."""
    if len(model.graph.input) != 1:
        names = ", ".join(i.name for i in model.graph.input)
        raise UnsupportedModelError(f"expected one data input, found {len(model.graph.input)} ({names})")
    vi = model.graph.input[0]
    return vi.name, [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in vi.type.tensor_type.shape.dim]


@dataclasses.dataclass
class ChipStats:
    """Accuracy over chips, summarized the way the CorrectNet paper and yield analyses report it."""

    clean_accuracy: float
    chip_accuracies: list[float]

    @property
    def mean(self) -> float:
        return float(np.mean(self.chip_accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.chip_accuracies))

    @property
    def p5(self) -> float:
        return float(np.percentile(self.chip_accuracies, 5))

    @property
    def worst(self) -> float:
        return float(np.min(self.chip_accuracies))

    @property
    def yield_(self) -> float:
        threshold = YIELD_FRACTION * self.clean_accuracy
        return float(np.mean(np.asarray(self.chip_accuracies) >= threshold))

    def summary(self) -> dict:
        return {
            "clean_accuracy": self.clean_accuracy, "mean": self.mean, "std": self.std,
            "p5": self.p5, "worst": self.worst, "yield": self.yield_, "chips": len(self.chip_accuracies),
        }


class MonteCarloEvaluator:
    """Clean and per-chip accuracy of a canonical model under a device config, through onnxruntime."""

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, *, batch_size: int = 500):
        self.input_name, self.input_shape = model_io(model)
        self.batch_size = batch_size
        self.clean_session = make_session(model)
        self.varied_model = InsertVariationPass(device)(model).model
        self.varied_session = make_session(self.varied_model)
        self.noise = noise_inputs(self.varied_model)

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return fit_to_input(x, self.input_name, self.input_shape)

    def _accuracy(self, session: ort.InferenceSession, x: np.ndarray, y: np.ndarray, extra=lambda: {}) -> float:
        correct = 0
        for xb, yb in batches(x, y, self.batch_size):
            logits = session.run(None, {self.input_name: xb, **extra()})[0]
            correct += int(np.sum(np.argmax(logits.reshape(len(xb), -1), axis=1) == yb))
        return correct / len(y)

    def clean_accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return self._accuracy(self.clean_session, x, y)

    def chip_feed(self, seed: int, chip: int) -> tuple[dict[str, np.ndarray], np.random.Generator]:
        """The per-chip noise tensors of chip ``chip``, and the generator for its read noise."""
        chip_rng = np.random.default_rng([seed, chip])
        feed = {n.name: n.noise.draw(chip_rng, n.shape) for n in self.noise if n.noise.per == "chip"}
        return feed, np.random.default_rng([seed, chip, 1])

    def chip_accuracy(self, x: np.ndarray, y: np.ndarray, seed: int, chip: int) -> float:
        feed, read_rng = self.chip_feed(seed, chip)
        per_inference = [n for n in self.noise if n.noise.per == "inference"]

        def batch_feed() -> dict[str, np.ndarray]:
            return {**feed, **{n.name: n.noise.draw(read_rng, n.shape) for n in per_inference}}

        return self._accuracy(self.varied_session, x, y, batch_feed)

    def chip_accuracies(self, x, y, samples: int, seed: int, *, progress: bool = True, desc: str = "chips") -> list[float]:
        chips = tqdm(range(samples), desc=desc, unit="chip", disable=not progress, leave=False)
        return [self.chip_accuracy(x, y, seed, chip) for chip in chips]

    def evaluate(self, x, y, samples: int, seed: int, *, progress: bool = True, desc: str = "chips") -> ChipStats:
        clean = self.clean_accuracy(x, y)
        return ChipStats(clean, self.chip_accuracies(x, y, samples, seed, progress=progress, desc=desc))


def sigma_sweep(
    model: onnx.ModelProto, device: DeviceConfig, sigmas: Sequence[float], x, y, samples: int, seed: int,
    *, batch_size: int = 500, progress: bool = True,
) -> dict[float, ChipStats]:
    """ChipStats at each log-normal sigma, the other device models unchanged."""
    results = {}
    for sigma in sigmas:
        evaluator = MonteCarloEvaluator(model, device.with_sigma(sigma), batch_size=batch_size)
        results[sigma] = evaluator.evaluate(x, y, samples, seed, progress=progress, desc=f"sigma={sigma:g}")
    return results


def plot_sigma_sweep(curves: dict[str, dict[float, ChipStats]], path: str | os.PathLike, title: str) -> None:
    """Accuracy vs sigma: a line per curve (mean), a band from worst to 5th percentile, clean dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rrcompile.io import atomic_write

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (label, sweep), color in zip(curves.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        sigmas = sorted(sweep)
        stats = [sweep[s] for s in sigmas]
        ax.plot(sigmas, [100 * s.mean for s in stats], "o-", color=color, label=f"{label}: mean")
        ax.fill_between(sigmas, [100 * s.worst for s in stats], [100 * s.p5 for s in stats], color=color, alpha=0.2,
                        label=f"{label}: worst..5th pct")
        ax.axhline(100 * stats[0].clean_accuracy, color=color, linestyle="--", linewidth=1, label=f"{label}: clean")
    ax.set_xlabel("log-normal sigma")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
