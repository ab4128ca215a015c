"""Every pass alone, on every quirk graph and the digits CNN: the outputs through onnxruntime are
the same before and after it (max abs diff <= 1e-5, relative to outputs above 1), with every
variation switched off, and the pass leaves the model it was given unchanged.

Each pass class in ``rrcompile.passes`` has a row in ``CASES``: how to build it for a model and
what to run first (a canonical model for the passes that require one; candidates or variation for
the passes that act on them). Variation is inserted with every device model at its identity
(sigma = eta = p = 0) and compensation starts as the identity (zero up weights); where the
prepared model's candidates act (random up weights), the pass that drops some is compared with
their gates fed 0. ``test_every_pass_has_a_case`` fails when a pass is added without a row.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DIGITS_MODEL, gates, with_up_weights
from graph_builders import QUIRK_MODELS

import rrcompile.passes
from rrcompile.compensation import candidates
from rrcompile.devices import noise_inputs, parse_device
from rrcompile.graph import model_io
from rrcompile.pass_manager import Pass
from rrcompile.passes.canonicalize import CanonicalizePass
from rrcompile.passes.convert_opset import ConvertOpsetPass
from rrcompile.passes.fold_batchnorm import FoldBatchNormPass
from rrcompile.passes.fold_constants import FoldConstantsPass
from rrcompile.passes.fuse_conv_bias import FuseConvBiasPass
from rrcompile.passes.fuse_matmul_add import FuseMatMulAddPass
from rrcompile.passes.infer_shapes import InferShapesPass
from rrcompile.passes.insert_compensation_candidates import InsertCompensationCandidatesPass
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.make_batch_symbolic import MakeBatchSymbolicPass
from rrcompile.passes.name_nodes import NameNodesPass
from rrcompile.passes.remove_dead_nodes import RemoveDeadNodesPass
from rrcompile.passes.remove_initializer_inputs import RemoveInitializerInputsPass
from rrcompile.passes.select_compensation import SelectCompensationPass
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.passes.tag_hardware import TagHardwarePass

TOLERANCE = 1e-5
# every device model but quantize (never the identity), each switched off: in the graph, changing nothing
ALL_OFF = parse_device("lognormal:sigma=0+programming:eta=0+stuck:p_off=0,p_on=0+read:eta=0")
# the same on crossbar tiles of 5 rows (every quirk layer spans several, the last one partial): tiles
# alone, with an ideal ADC, change the computation but not its result
TILED_OFF = parse_device("tile:size=5,cols=3+lognormal:sigma=0,mapping=differential+programming:eta=0")


def discovered_passes() -> set[type[Pass]]:
    """Every Pass subclass defined in a module of ``rrcompile.passes``."""
    found = set()
    for info in pkgutil.iter_modules(rrcompile.passes.__path__):
        module = importlib.import_module(f"{rrcompile.passes.__name__}.{info.name}")
        found |= {value for value in vars(module).values()
                  if isinstance(value, type) and issubclass(value, Pass) and value.__module__ == module.__name__}
    return found


def exported(model: onnx.ModelProto) -> onnx.ModelProto:
    """Weights out of the graph inputs, as CanonicalizePass does first: graphsurgeon exports no
    initializer as an input, which a graph below IR version 4 (cntk's) would need."""
    return RemoveInitializerInputsPass()(model).model


def canonical(model: onnx.ModelProto) -> onnx.ModelProto:
    return CanonicalizePass()(model).model


def with_candidates(model: onnx.ModelProto) -> onnx.ModelProto:
    """Canonical, with a compensation candidate at every layer whose up weights are random, so they act."""
    return with_up_weights(InsertCompensationCandidatesPass(rank=2)(canonical(model)).model)


def simulated(model: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`with_candidates`, varied by every device model at its identity."""
    return InsertVariationPass(ALL_OFF)(with_candidates(model)).model


def simulated_tiles(model: onnx.ModelProto) -> onnx.ModelProto:
    """:func:`with_candidates`, on tiles, varied by device models at their identity."""
    return InsertVariationPass(TILED_OFF)(with_candidates(model)).model


def dropped_layers(model: onnx.ModelProto) -> list[str]:
    """The layers SelectCompensationPass drops here: every candidate's but the first."""
    return [c.layer for c in candidates(model)[1:]]


@dataclasses.dataclass(frozen=True)
class Case:
    make: Callable[[onnx.ModelProto], Pass]  # the pass, given the prepared model
    prepare: Callable[[onnx.ModelProto], onnx.ModelProto] = lambda model: model
    # extra inputs fed to the prepared model for the outputs the pass must keep
    before: Callable[[onnx.ModelProto], dict[str, np.ndarray]] = lambda model: {}
    label: str = ""  # tells apart two cases of one pass


CASES: dict[type[Pass], list[Case]] = {
    # canonicalization: each pass alone on the graphs as exported
    RemoveInitializerInputsPass: [Case(lambda m: RemoveInitializerInputsPass())],
    ConvertOpsetPass: [Case(lambda m: ConvertOpsetPass())],
    NameNodesPass: [Case(lambda m: NameNodesPass())],
    MakeBatchSymbolicPass: [Case(lambda m: MakeBatchSymbolicPass())],
    FoldConstantsPass: [Case(lambda m: FoldConstantsPass(), exported)],
    FuseConvBiasPass: [Case(lambda m: FuseConvBiasPass(), exported)],
    FuseMatMulAddPass: [Case(lambda m: FuseMatMulAddPass(), exported)],
    FoldBatchNormPass: [Case(lambda m: FoldBatchNormPass(), exported)],
    RemoveDeadNodesPass: [Case(lambda m: RemoveDeadNodesPass(), exported)],
    InferShapesPass: [Case(lambda m: InferShapesPass())],
    CanonicalizePass: [Case(lambda m: CanonicalizePass())],
    # the compiler's passes, on canonical models
    InsertVariationPass: [Case(lambda m: InsertVariationPass(ALL_OFF), canonical),
                          Case(lambda m: InsertVariationPass(TILED_OFF), canonical, label="tiles")],
    InsertCompensationCandidatesPass: [
        Case(lambda m: InsertCompensationCandidatesPass(rank=2), canonical),
        Case(lambda m: InsertCompensationCandidatesPass(rank=2, calibrated=True), canonical, label="calibrated"),
    ],
    SelectCompensationPass: [Case(lambda m: SelectCompensationPass([c.layer for c in candidates(m)[:1]]),
                                  with_candidates, lambda m: gates(m, 0.0, dropped_layers(m)))],
    StripSimulationPass: [Case(lambda m: StripSimulationPass(), simulated),
                          Case(lambda m: StripSimulationPass(), simulated_tiles, label="tiles")],
    TagHardwarePass: [Case(lambda m: TagHardwarePass(), with_candidates)],
}

MODELS: dict[str, Callable[[], tuple[onnx.ModelProto, np.ndarray]]] = {
    **QUIRK_MODELS,
    "digits_cnn": lambda: (onnx.load(str(DIGITS_MODEL)), np.random.default_rng(0).random((3, 1, 8, 8), np.float32)),
}


def feed(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Draws for a varied model's noise inputs (any draw: every device model is off)."""
    rng = np.random.default_rng(0)
    return {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(model)}


def outputs(model: onnx.ModelProto, x: np.ndarray, extra: dict[str, np.ndarray]) -> np.ndarray:
    """The first output, with onnxruntime's graph optimizations and weight prepacking off: they pick
    kernels by whether a weight is constant, which moves float32 results by an ulp where a pass
    turns a computed weight into an initializer (StripSimulationPass), not what is compared here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3  # compensation gates are initializer-backed inputs by design
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x, **extra})[0]


def test_every_pass_has_a_case():
    discovered, covered = discovered_passes(), set(CASES)
    missing = sorted(cls.__name__ for cls in discovered - covered)
    assert not missing, f"passes without an equivalence case in CASES: {', '.join(missing)}"
    assert covered <= discovered, "CASES names a class that is not a pass of rrcompile.passes"


PARAMS = [pytest.param(cls.__name__, case, id="-".join(filter(None, [cls.__name__, case.label])))
          for cls, cases in CASES.items() for case in cases]


@pytest.mark.parametrize(("pass_name", "case"), PARAMS)
def test_every_case_changes_some_model(pass_name, case):
    """A case whose pass finds nothing to do on any model would compare a model with itself."""
    assert any(case.make(model)(model).modified for model in (case.prepare(build()[0]) for build in MODELS.values()))


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize(("pass_name", "case"), PARAMS)
def test_pass_keeps_the_outputs(pass_name, case, model_name):
    original, x = MODELS[model_name]()
    model = case.prepare(original)
    before_bytes = model.SerializeToString()
    result = case.make(model)(model)
    assert model.SerializeToString() == before_bytes, f"{pass_name} changed its input model"
    assert isinstance(result.model, onnx.ModelProto)
    if result.modified:
        onnx.checker.check_model(result.model)
    expected = outputs(model, x, {**feed(model), **case.before(model)})
    got = outputs(result.model, x, feed(result.model))
    assert got.shape == expected.shape
    # float32 keeps 7 digits: 1e-5 absolute below |y| = 1, relative above (cntk's outputs reach 236)
    assert np.max(np.abs(got - expected)) <= TOLERANCE * max(1.0, float(np.max(np.abs(expected)))), \
        f"{pass_name} on {model_name}"
    noise = {n.name for n in noise_inputs(result.model) + noise_inputs(model)}
    assert model_io(result.model, ignore=noise)[0] == model_io(model, ignore=noise)[0]
