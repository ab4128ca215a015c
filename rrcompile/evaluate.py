"""Monte Carlo evaluation: accuracy of a model over many simulated chips.

One sample is one chip: the per-chip noise tensors are drawn once from the chip's own generator,
``numpy.random.default_rng([seed, chip])``, so every image of a sample sees the same programmed
weights and chip ``k`` is the same chip whatever ``--samples`` is. Read noise (per inference)
comes from a second stream of the same chip, one draw per batch.

A chip is *programmed* once, as the hardware is: the variation subgraph of the varied model (the
``ai.rrcompile`` function chains) runs once on the chip's noise to give its weights, which then
become constant initializers of a per-chip onnxruntime session. Constant weights let onnxruntime
prepack them (NCHWc convolutions), which a weight fed as a run-time input forbids. With read
noise the weights change on every run, so the varied graph itself runs every batch. A chip's
calibration slots run folded into their programmed layers where that is exact
(:mod:`rrcompile.slot_folding`): a calibrated chip then costs what the network alone costs.

Chips are independent, so ``chip_accuracies`` and :func:`sigma_sweep` hand them to a
:class:`~rrcompile.executor.ChipExecutor` (in this process by default, or Ray workers); an
evaluator pickles as its recipe (model, device, options), so a worker rebuilds it once.

On a GPU (``device_type="cuda"``, or ``"auto"`` where torch sees one) inference runs on
onnxruntime's CUDA execution provider when this onnxruntime has it (the ``onnxruntime-gpu``
wheel): the same runtime as the CPU path, so the same graph and op semantics. Otherwise it runs
on the torch executor on CUDA (:class:`rrcompile.torch_graph.TorchSession`), which equals
onnxruntime op for op (``tests/rrcompile/test_torch_graph.py``), because the default onnxruntime
wheel is CPU-only while torch, which rrcompile trains with, has CUDA wherever there is a GPU.
Programming a chip (its variation subgraph, run once per chip) stays on the CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from rrcompile.data import batches, fit_to_input
from rrcompile import crossbar
from rrcompile.executor import IN_PROCESS, ChipExecutor
from rrcompile.crossbar import is_crossbar
from rrcompile.devices import DeviceConfig, noise_inputs
from rrcompile.errors import DeviceSpecError
from rrcompile.graph import (
    AnalogLayer, analog_layers, export_graph, import_graph, model_io, remove_unused_functions, with_initializers,
)
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.slot_folding import FoldedSlots

YIELD_FRACTION = 0.95  # a chip "yields" if it keeps this fraction of the clean accuracy
BATCH_SIZE = 500  # images per onnxruntime run: inference only, so larger than a training mini-batch
CUDA_PROVIDER = "CUDAExecutionProvider"
_threads = 0  # intra-op threads of each onnxruntime session; 0: onnxruntime's default, every core


def use_threads(count: int) -> None:
    """Keep this process's onnxruntime sessions to ``count`` threads: a Ray worker that shares the
    machine with others takes its own share of the cores, not all of them each. (Torch follows
    ``OMP_NUM_THREADS``, which Ray sets to a worker's CPUs.)"""
    global _threads
    _threads = count


_shared_arena = False  # whether this process registered its CPU arena with onnxruntime


def _share_arena() -> None:
    """Register one CPU arena for the whole process (once). A chip's session lives for one pass:
    with an arena of its own, that pass grows it from nothing and page-faults fresh memory on
    every chip; on the shared arena it reuses what earlier chips touched. bench/mc_throughput.py,
    LeNet-5, 5 runs alternated on 2 loaded cores: Monte Carlo / clean throughput 0.79 mean with
    per-session arenas, 0.91 shared, higher in every pair. The arena keeps its high-water mark
    until the process ends."""
    global _shared_arena
    if not _shared_arena:
        cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(cpu, ort.OrtArenaCfg(0, -1, -1, -1))  # onnxruntime's defaults
        _shared_arena = True


def _session_options(*, short_lived: bool = False) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = _threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # ORT warns about noise inputs a sigma=0 graph never reads
    # idle threads stop spinning after 1 ms: onnxruntime's default spin outlasts a run by tens of
    # ms, and a process here runs many sessions in turn (a clean pass, then chips; a chip, its
    # calibration's solves, its calibrated pass), each one's cores taken by the last one's
    # spinning threads. LeNet-5, 2 idle cores: a chip's pass right after a clean session's took
    # 112 ms with the default, 87-89 ms with this, as after another chip; bench/mc_throughput.py
    # 0.926-0.949 against 0.867-0.893 without, alternated, clean inference as fast.
    options.add_session_config_entry("session.intra_op.spin_duration_us", "1000")
    if short_lived:
        _share_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
        # no memory pattern for a session that lives for one pass: its first two runs would trace
        # and plan one (a chip's first two batches of 500 took 6.1 and 5.4 ms against 4.5 after,
        # LeNet-5 on 2 idle cores); without one, the shared arena hands out what earlier chips'
        # passes freed, and every batch runs at the steady pace
        options.enable_mem_pattern = False
    return options


def make_session(model: onnx.ModelProto, device_type: str = "cpu", *, short_lived: bool = False):
    """An inference session for ``model`` (``run(None, feed)``) on ``device_type`` (``cpu``, ``cuda``
    or ``auto``): onnxruntime on the CPU; on a GPU, see the module docstring."""
    providers = ["CPUExecutionProvider"]
    if device_type != "cpu":
        # torch only when a GPU may be asked for: evaluating on the CPU never loads it
        from rrcompile.torch_graph import TorchSession, default_device

        target = default_device(device_type)
        if target.type == "cuda":
            if CUDA_PROVIDER not in ort.get_available_providers():
                return TorchSession(model, target)
            providers.insert(0, CUDA_PROVIDER)
    return ort.InferenceSession(model.SerializeToString(), _session_options(short_lived=short_lived), providers=providers)


def split_programming(varied: onnx.ModelProto, data_input: str) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """Split a varied model into (program, chip model).

    ``program`` maps the per-chip noise inputs to every analog layer's programmed weight (its
    outputs are named ``<layer>.programmed_weight``). ``chip model`` is the inference graph with
    each of those as a float32 initializer (holding the target weight until a chip's is written).
    A tiled layer's programmed weight is the one its ``TileWeight`` reads: the chip model keeps
    the crossbar functions, which onnxruntime folds over the constant weight.
    """
    nodes = {n.name: n for n in varied.graph.node}
    producer = {out: n for n in varied.graph.node for out in n.output}

    def reader(layer: AnalogLayer) -> tuple[str, int, str]:
        """(node, input index, tensor) where the layer's programmed weight is read."""
        tensor = nodes[layer.node].input[1]
        if tensor in producer and is_crossbar(producer[tensor]):
            return producer[tensor].name, 0, producer[tensor].input[0]
        return layer.node, 1, tensor

    # weight tensor -> (reader node, input index, layer), for the layers whose weight comes through a variation chain
    varied_layers = {tensor: (node, index, layer) for layer in analog_layers(varied)
                     for node, index, tensor in [reader(layer)] if tensor != layer.weight}
    programmed = {tensor: f"{layer.node}.programmed_weight" for tensor, (_, _, layer) in varied_layers.items()}
    graph = import_graph(varied)
    graph.inputs = [t for t in graph.inputs if t.name != data_input]
    tensors = graph.tensors()
    graph.outputs = [tensors[name] for name in programmed]
    for tensor in graph.outputs:
        tensor.name = programmed[tensor.name]
        tensor.dtype, tensor.shape = np.float32, None
    program = export_graph(graph, varied)

    graph = import_graph(varied)
    tensors, by_name = graph.tensors(), {node.name: node for node in graph.nodes}
    for tensor, (node, index, layer) in varied_layers.items():
        by_name[node].inputs[index] = gs.Constant(programmed[tensor], tensors[layer.weight].values)
    noise = {n.name for n in noise_inputs(varied)}
    graph.inputs = [t for t in graph.inputs if t.name not in noise]
    chip = export_graph(graph, varied)
    remove_unused_functions(chip)  # the variation functions go; compensation functions stay
    # graphsurgeon drops initializer-backed inputs (compensation gates); a chip must still take them
    listed = {i.name for i in chip.graph.input}
    chip.graph.input.extend(i for i in varied.graph.input if i.name not in noise and i.name not in listed)
    return program, chip


def _folded(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its calibration slots, at the parameters it holds, folded into their layers."""
    folding = FoldedSlots(model)
    return with_initializers(folding.model, folding.values({})) if folding.folds else model


def draw_chip(varied: onnx.ModelProto, seed: int, chip: int) -> dict[str, np.ndarray]:
    """The per-chip noise tensors of chip ``chip`` of run ``seed`` for varied model ``varied``:
    the one definition of a chip, shared by the Monte Carlo evaluator and calibration."""
    chip_rng = np.random.default_rng([seed, chip])
    return {n.name: n.noise.draw(chip_rng, n.shape) for n in noise_inputs(varied) if n.noise.per == "chip"}


def session_accuracy(session: ort.InferenceSession, input_name: str, x: np.ndarray, y: np.ndarray, batch_size: int,
                     extra: Callable[[], dict[str, np.ndarray]] = dict) -> float:
    """Top-1 accuracy of a classifier session; ``extra()`` adds to each batch's feed (noise inputs)."""
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        # a batch's logits are gone before the next run: a chip session's outputs live in the
        # shared arena, and one held through the next run slows it (LeNet-5, 2 idle cores: 96
        # against 90 ms a pass)
        correct += _correct(session.run(None, {input_name: xb, **extra()})[0], yb)
    return correct / len(y)


def _correct(logits: np.ndarray, labels: np.ndarray) -> int:
    return int(np.sum(np.argmax(logits.reshape(len(labels), -1), axis=1) == labels))


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray, batch_size: int = BATCH_SIZE) -> float:
    """Clean top-1 accuracy of ``model`` on prepared inputs, through onnxruntime."""
    return session_accuracy(make_session(model), model_io(model)[0], x, y, batch_size)


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
    """Clean and per-chip accuracy of a canonical model under a device config, through onnxruntime.

    A device with an ``adc`` term needs the ADC ranges (:func:`rrcompile.crossbar.adc_ranges`):
    given as ``adc_ranges``, or fixed here from ``adc_images`` (training images, prepared).
    ``device_type`` is where inference runs (``cpu``, ``cuda``, ``auto``; see the module docstring).
    ``fold_slots``: chips run their calibration slots folded into their layers (a caller that feeds
    the slots' gates at run time needs them as they are).
    """

    def __init__(self, model: onnx.ModelProto, device: DeviceConfig, *, batch_size: int = BATCH_SIZE,
                 adc_images: np.ndarray | None = None, adc_ranges: Mapping[str, np.ndarray] | None = None,
                 device_type: str = "cpu", fold_slots: bool = True):
        self.input_name, self.input_shape = model_io(model)
        self.batch_size, self.device_type = batch_size, device_type
        self.clean_session = make_session(_folded(model) if fold_slots else model, device_type)
        self.adc_ranges = _ranges(model, device, adc_images, adc_ranges)
        self._recipe = dict(model=model, device=device, batch_size=batch_size, adc_ranges=self.adc_ranges,
                            device_type=device_type, fold_slots=fold_slots)
        varied = InsertVariationPass(device, self.adc_ranges)(model)
        self.varied_model = varied.model
        self.noise = noise_inputs(self.varied_model)
        self.read_noise = [n for n in self.noise if n.noise.per == "inference"]
        self.exact = not varied.modified  # no layer has a device model: every chip is the clean model
        # sigma = 0 and the like: every chip is programmed to the target weights, so all are one chip
        self.identical_chips = self.exact or device.same_chips
        if self.read_noise:
            self.varied_session = make_session(self.varied_model, device_type)
        elif not self.exact:
            program, chip_model = split_programming(self.varied_model, self.input_name)
            # tiles or ADCs and no weight effect: nothing to program, every chip is the chip model
            self.program_session = make_session(program) if program.graph.output else None
            self.programmed = [o.name for o in program.graph.output]
            # a chip runs with its calibration slots folded into their layers: at the layers' cost
            folding = FoldedSlots(chip_model) if fold_slots else None
            self.folded = folding if folding is not None and folding.folds else None  # None: nothing to fold
            self.chip_model = self.folded.model if self.folded is not None else chip_model
            self._initializers = {t.name: t for t in self.chip_model.graph.initializer}

    def __getstate__(self) -> dict:
        # sessions do not pickle: the evaluator travels as what builds it (to a Ray worker, once per map)
        return self._recipe

    def __setstate__(self, recipe: dict) -> None:
        self.__init__(**recipe)

    def prepare(self, x: np.ndarray, data_name: str | None = None) -> np.ndarray:
        return fit_to_input(x, self.input_name, self.input_shape, data_name=data_name)

    def _accuracy(self, session: ort.InferenceSession, x: np.ndarray, y: np.ndarray, extra=dict) -> float:
        return session_accuracy(session, self.input_name, x, y, self.batch_size, extra)

    def clean_accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        return self._accuracy(self.clean_session, x, y)

    def chip_feed(self, seed: int, chip: int) -> dict[str, np.ndarray]:
        """The per-chip noise tensors of chip ``chip`` of run ``seed``."""
        return draw_chip(self.varied_model, seed, chip)

    def chip_accuracy(self, x: np.ndarray, y: np.ndarray, seed: int, chip: int,
                      digital: Mapping[str, np.ndarray] | None = None) -> float:
        session, batch_feed = self.chip(seed, chip, digital)
        return self._accuracy(session, x, y, batch_feed)

    def chip(self, seed: int, chip: int, digital: Mapping[str, np.ndarray] | None = None,
             ) -> tuple[ort.InferenceSession, Callable[[], dict[str, np.ndarray]]]:
        """A session for one simulated chip, and the extra feed each of its runs needs.

        ``digital`` replaces initializers of the digital logic for this chip only (by name: a
        calibration's per-chip compensation parameters).
        """
        if self.exact:
            session = self.clean_session if not digital else self._short_lived(with_initializers(self.varied_model, digital))
            return session, dict
        feed = self.chip_feed(seed, chip)
        if self.read_noise:
            read_rng = np.random.default_rng([seed, chip, 1])
            session = self.varied_session if not digital else self._short_lived(with_initializers(self.varied_model, digital))
            return session, lambda: {**feed, **{n.name: n.noise.draw(read_rng, n.shape) for n in self.read_noise}}
        programmed = self.program_session.run(None, feed) if self.program_session is not None else []
        weights, absorbed = dict(zip(self.programmed, programmed)), set()
        if self.folded is not None:
            weights.update(self.folded.values(weights, digital))
            absorbed = self.folded.absorbed
        # embedded, not overridden with add_initializer: onnxruntime prepacks conv weights from
        # the model's own initializer data, so an override gives wrong results
        for name, weight in weights.items():
            self._initializers[name].raw_data = weight.astype(np.float32, copy=False).tobytes()
        unfolded = {name: value for name, value in (digital or {}).items() if name not in absorbed}
        return self._short_lived(with_initializers(self.chip_model, unfolded) if unfolded else self.chip_model), dict

    def _short_lived(self, model: onnx.ModelProto):
        return make_session(model, self.device_type, short_lived=True)

    def chip_accuracies(self, x, y, samples: int, seed: int, *, progress: bool = True, desc: str = "chips",
                        executor: ChipExecutor = IN_PROCESS) -> list[float]:
        """Accuracy of chips ``0 .. samples - 1`` of ``seed``, in chip order, computed by ``executor``."""
        if self.identical_chips:  # every chip is the same chip: measure it once
            return [self.chip_accuracy(x, y, seed, 0)] * samples
        return executor.map_chips(functools.partial(self.chip_accuracy, x, y, seed), range(samples),
                                  progress=progress, desc=desc)

    def evaluate(self, x, y, samples: int, seed: int, *, progress: bool = True, desc: str = "chips",
                 executor: ChipExecutor = IN_PROCESS) -> ChipStats:
        clean = self.clean_accuracy(x, y)
        return ChipStats(clean, self.chip_accuracies(x, y, samples, seed, progress=progress, desc=desc, executor=executor))


def _ranges(model: onnx.ModelProto, device: DeviceConfig, images: np.ndarray | None,
            ranges: Mapping[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    if ranges is not None or not crossbar.needs_adc_ranges(device):
        return dict(ranges or {})
    if images is None:
        raise DeviceSpecError("device 'adc': its ranges are fixed from training images, and none were given")
    return crossbar.adc_ranges(model, device, images)


def sigma_sweep(
    model: onnx.ModelProto, device: DeviceConfig, sigmas: Sequence[float], x, y, samples: int, seed: int,
    *, batch_size: int = BATCH_SIZE, progress: bool = True, adc_images: np.ndarray | None = None,
    executor: ChipExecutor = IN_PROCESS, device_type: str = "cpu",
) -> dict[float, ChipStats]:
    """ChipStats at each log-normal sigma, the other device models unchanged (the ADC ranges,
    fixed on the clean network, are the same at every sigma)."""
    results = {}
    ranges = _ranges(model, device, adc_images, None)
    for sigma in sigmas:
        evaluator = MonteCarloEvaluator(model, device.with_sigma(sigma), batch_size=batch_size, adc_ranges=ranges,
                                        device_type=device_type)
        results[sigma] = evaluator.evaluate(x, y, samples, seed, progress=progress, desc=f"sigma={sigma:g}",
                                            executor=executor)
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
