"""Tiles and ADCs: each function against its numpy reference and its torch version, the tiled layer
against the untiled one (sigma 0, 16 bits) and against an independent per-tile computation, seeded
statistics of the ADC noise, the ranges fixed from data, and the Monte Carlo evaluator with them."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS_MODEL, REAL_MODELS, run, shared_path
from graph_builders import make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.crossbar import (
    ADC, FUNCTIONS, TILE_SPLIT_CONV, TILE_SPLIT_DENSE, TILE_WEIGHT, adc_ranges, adc_reference, is_crossbar,
    tile_split_reference, tile_weight_reference, torch_ops,
)
from rrcompile.data import Preprocess, load_data
from rrcompile.devices import ADC_NOISE_OP, noise_inputs, parse_device, simulated_device
from rrcompile.evaluate import MonteCarloEvaluator
from rrcompile.graph import RRCOMPILE_DOMAIN, TARGET_OPSET
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.passes.strip_simulation import StripSimulationPass
from rrcompile.pipeline import canonicalize
from rrcompile.torch_graph import TorchGraph

RNG_SEED = 11


def function_model(op: str, inputs: dict[str, np.ndarray], out_shape, **attrs) -> onnx.ModelProto:
    """A one-node graph calling crossbar function ``op`` on graph inputs named like ``inputs``."""
    node = helper.make_node(op, list(inputs), ["Y"], domain=RRCOMPILE_DOMAIN, **attrs)
    graph = helper.make_graph([node], "f", [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                                            for k, v in inputs.items()], [helper.make_tensor_value_info("Y", TensorProto.FLOAT, out_shape)])
    return make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET), helper.make_opsetid(RRCOMPILE_DOMAIN, 1)],
                      functions=[FUNCTIONS[op]()])


def run_feed(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)[0]


def torch_op(op: str, inputs: dict[str, np.ndarray], **attrs) -> np.ndarray:
    return torch_ops()[f"{RRCOMPILE_DOMAIN}:{op}"]([torch.from_numpy(v) for v in inputs.values()], attrs)[0].numpy()


def function_cases():
    rng = np.random.default_rng(RNG_SEED)
    w = rng.standard_normal((4, 3, 2, 2)).astype(np.float32)
    mask = (rng.random((1, 3, 3, 2, 2)) < 0.5).astype(np.float32)
    g = (rng.standard_normal((5, 4, 3)) * 2).astype(np.float32)
    a = (np.abs(rng.standard_normal((4, 3))) + 0.5).astype(np.float32)
    a[0, 0] = 0  # a tile whose clean partial sums were all zero
    z = rng.standard_normal((4, 3)).astype(np.float32)
    p_conv = rng.standard_normal((2, 12, 3, 3)).astype(np.float32)
    p_dense = rng.standard_normal((2, 5, 12)).astype(np.float32)
    return {
        TILE_WEIGHT: ({"W": w, "Mask": mask, "Shape": np.array([12, 3, 2, 2], np.int64)}, dict(axes=[1], size=4, cols=4),
                      lambda: tile_weight_reference(w, mask, [1], np.array([12, 3, 2, 2]))),
        TILE_SPLIT_CONV: ({"P": p_conv}, dict(tiles=3), lambda: tile_split_reference(p_conv, 3, True)),
        TILE_SPLIT_DENSE: ({"P": p_dense}, dict(tiles=4), lambda: tile_split_reference(p_dense, 4, False)),
        ADC: ({"G": g, "R": a}, dict(bits=4, range=100.0), lambda: adc_reference(g, a, 4)),
        ADC_NOISE_OP: ({"G": g, "R": a, "Z": z}, dict(bits=5, range=99.0, noise=0.1), lambda: adc_reference(g, a, 5, 0.1, z)),
    }


@pytest.mark.parametrize("op", sorted(FUNCTIONS))
def test_function_matches_numpy_reference_and_torch(op):
    inputs, attrs, reference = function_cases()[op]
    expected = reference()
    model = function_model(op, inputs, expected.shape, **attrs)
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_array_equal(run_feed(model, inputs), expected)
    np.testing.assert_array_equal(torch_op(op, inputs, **attrs), expected)


def test_adc_levels_clip_and_straight_through_gradient():
    g = torch.linspace(-3, 3, 601, requires_grad=True)
    a = torch.tensor(2.0)
    y = torch_ops()[f"{RRCOMPILE_DOMAIN}:{ADC}"]([g, a], {"bits": 3})[0]
    assert set(np.round(y.detach().numpy() / (2 / 3)).astype(int)) == {-3, -2, -1, 0, 1, 2, 3}  # 2^3 - 1 levels
    assert y.abs().max().item() == pytest.approx(2.0)
    y.sum().backward()
    inside = g.detach().abs() <= 2
    assert torch.all(g.grad[inside] == 1) and torch.all(g.grad[~inside] == 0)


# --- small graphs: conv and dense layers whose rows the tile size does not divide ------------------

def _model(nodes, x_shape, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x_shape[1:]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return canonicalize(make_model(graph, opset_imports=[helper.make_opsetid("", TARGET_OPSET)]))


def small_graphs() -> dict[str, tuple[onnx.ModelProto, np.ndarray]]:
    rng = np.random.default_rng(3)

    def w(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    conv = _model([helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv", pads=[1, 1, 1, 1]),
                   helper.make_node("Relu", ["h"], ["r"], name="relu"),
                   helper.make_node("Conv", ["r", "w2"], ["y"], name="conv_groups", group=2, strides=[2, 2])],
                  (1, 3, 9, 9), {"w1": w(6, 3, 3, 3), "b1": w(6), "w2": w(4, 3, 2, 2)})  # 27 and 12 rows
    dense = _model([helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="gemm_t", transB=1, beta=0.5),
                    helper.make_node("Relu", ["h"], ["r"], name="relu"),
                    helper.make_node("Gemm", ["r", "w2", "b2"], ["h2"], name="gemm"),
                    helper.make_node("MatMul", ["h2", "w3"], ["y"], name="matmul")],
                   (1, 23), {"w1": w(9, 23), "b1": w(9), "w2": w(9, 7), "b2": w(1, 7), "w3": w(7, 5)})  # 23, 9, 7 rows
    return {"conv": (conv, rng.standard_normal((8, 3, 9, 9)).astype(np.float32)),
            "dense": (dense, rng.standard_normal((8, 23)).astype(np.float32))}


def tiled(model, x, spec):
    device = parse_device(spec)
    varied = InsertVariationPass(device, adc_ranges(model, device, x))(model).model
    onnx.checker.check_model(varied, full_check=True)
    return varied


@pytest.mark.parametrize("name", ["conv", "dense"])
def test_tiles_and_16_bit_adc_at_sigma_0_keep_the_outputs(name):
    model, x = small_graphs()[name]
    clean = run(model, x)
    scale = np.abs(clean).max()
    exact = tiled(model, x, "tile:size=4")
    assert len([n for n in exact.graph.node if n.op_type == TILE_WEIGHT]) == 2 + (name == "dense")
    np.testing.assert_allclose(run(exact, x), clean, atol=1e-5 * max(1.0, scale), rtol=0)
    varied = tiled(model, x, "tile:size=4,cols=3+adc:bits=16+lognormal:sigma=0")
    got = run(varied, x, **{n.name: np.zeros(n.shape, np.float32) for n in noise_inputs(varied)})
    assert np.abs(got - clean).max() <= 1e-4 * scale


def _per_tile(model, x, size, bits, ranges):
    """An independent computation of the first layer: a separate product per tile on its rows only
    (sliced, not masked), each through the ADC reference, summed, plus the bias."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = model.graph.node[0]
    w, b = inits[node.input[1]], inits[node.input[2]]
    out = 0
    if node.op_type == "Conv":
        flat = w.reshape(w.shape[0], -1)
        for t in range(-(-flat.shape[1] // size)):
            masked = np.zeros_like(flat)
            masked[:, t * size:(t + 1) * size] = flat[:, t * size:(t + 1) * size]
            p = F.conv2d(torch.from_numpy(x), torch.from_numpy(masked.reshape(w.shape)), padding=1).numpy()
            out = out + adc_reference(p, ranges[:, t].reshape(-1, 1, 1), bits)
        return out + b.reshape(-1, 1, 1)
    for t in range(-(-w.shape[1] // size)):  # Gemm transB: W [M, K]
        p = x[:, t * size:(t + 1) * size] @ w[:, t * size:(t + 1) * size].T
        out = out + adc_reference(p, ranges[:, t], bits)
    return out + 0.5 * b


@pytest.mark.parametrize("name", ["conv", "dense"])
def test_tiled_adc_layer_equals_an_independent_per_tile_computation(name):
    model, x = small_graphs()[name]
    first = model.graph.node[0].name
    device = parse_device("tile:size=5+adc:bits=5,range=90")
    ranges = adc_ranges(model, device, x)
    varied = InsertVariationPass(device, ranges)(model).model
    probe = onnx.ModelProto.FromString(varied.SerializeToString())
    probe.graph.output.append(helper.make_tensor_value_info(model.graph.node[0].output[0], TensorProto.FLOAT, None))
    import onnxruntime as ort

    got = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[1]
    expected = _per_tile(model, x, 5, 5, ranges[first])
    step = ranges[first].max() / 15
    # summation order differs: a partial sum on a rounding boundary may land one step away
    assert np.mean(np.isclose(got, expected, atol=1e-4)) > 0.99
    assert np.abs(got - expected).max() <= step * ranges[first].shape[1] + 1e-4


def test_adc_ranges_are_percentiles_per_tile_and_column_block():
    model, x = small_graphs()["dense"]
    full = adc_ranges(model, parse_device("tile:size=10,cols=4+adc:bits=8"), x)
    half = adc_ranges(model, parse_device("tile:size=10,cols=4+adc:bits=8,range=50"), x)
    assert full["gemm_t"].shape == (9, 3) and full["matmul"].shape == (5, 1)
    assert np.all(half["gemm_t"] < full["gemm_t"])
    np.testing.assert_array_equal(full["gemm_t"][:4], np.broadcast_to(full["gemm_t"][0], (4, 3)))  # one range per block
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    w = inits["w1"]
    partial = np.abs(x[:, 20:] @ w[:4, 20:].T)  # the last tile (3 rows) of the first column block
    assert full["gemm_t"][0, 2] == pytest.approx(partial.max(), rel=1e-5)


def test_adc_noise_is_seeded_per_inference_with_std_noise_times_range():
    model, x = small_graphs()["dense"]
    varied = tiled(model, x, "tile:size=8+adc:bits=16,noise=0.05")
    (noise,) = [n for n in noise_inputs(varied) if n.name == "gemm_t.adc_noise"]
    assert noise.noise.per == "inference" and noise.shape == (9, 3)
    # the noise the ADC adds, seen at the converted partial sums of the first layer
    probe = onnx.ModelProto.FromString(varied.SerializeToString())
    probe.graph.output.extend([helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                               for n in ("gemm_t.tile_outputs", "gemm_t.adc")])
    ranges = {t.name: numpy_helper.to_array(t) for t in varied.graph.initializer}["gemm_t.adc_range"]
    import onnxruntime as ort

    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(50):
        feed = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(varied)}
        _, g, q = session.run(None, {"x": x, **feed})
        inside = np.abs(g) < 0.8 * ranges
        errors.append(((q - g) / (0.05 * ranges))[inside])
    e = np.concatenate(errors)
    assert abs(e.mean()) < 5 / np.sqrt(e.size)  # 5-sigma bound of a standard normal's sample mean
    assert abs(e.std() - 1) < 5 / np.sqrt(2 * e.size) + 0.01  # + quantization (step / (0.05 A) = 6e-4)


def test_torch_graph_equals_onnxruntime_and_trains_through_the_adc():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    x = np.random.default_rng(1).random((8, 1, 8, 8), np.float32)
    varied = tiled(model, x, "tile:size=20+adc:bits=8,noise=0.02+lognormal:sigma=0.3,mapping=differential+read:eta=0.01")
    rng = np.random.default_rng(2)
    draws = {n.name: n.noise.draw(rng, n.shape) for n in noise_inputs(varied)}
    module = TorchGraph(varied)
    got = module(torch.from_numpy(x), {k: torch.from_numpy(v) for k, v in draws.items()})
    expected = run(varied, x, **draws)
    # the same partial sums summed in another order can round to the neighbouring ADC level
    assert np.abs(got.detach().numpy() - expected).max() <= 1e-2 * np.abs(expected).max()
    got.sum().backward()
    grads = dict(module.named_onnx_parameters())
    assert all(grads[layer.weight].grad is not None and grads[layer.weight].grad.abs().sum() > 0
               for layer in module.analog_layers)


def test_strip_simulation_restores_the_untiled_layer_and_the_device_reads_back():
    model, x = small_graphs()["conv"]
    varied = tiled(model, x, "tile:size=4,cols=2+adc:bits=7,range=99.5,noise=0.01+programming:eta=0.02")
    device = simulated_device(varied)
    assert [m.spec() for m in device.layers["conv"]] == ["programming:eta=0.02", "tile:size=4,cols=2",
                                                          "adc:bits=7,range=99.5,noise=0.01"]
    stripped = StripSimulationPass()(varied).model
    assert not any(is_crossbar(n) for n in stripped.graph.node)
    assert [i.name for i in stripped.graph.input] == [i.name for i in model.graph.input]
    assert sorted(t.name for t in stripped.graph.initializer) == sorted(t.name for t in model.graph.initializer)
    np.testing.assert_array_equal(run(stripped, x), run(model, x))


def test_an_adc_without_ranges_is_refused():
    from rrcompile.errors import DeviceSpecError, PassError

    model, x = small_graphs()["dense"]
    with pytest.raises(PassError, match="has an ADC but no ADC ranges"):
        InsertVariationPass(parse_device("adc:bits=8"))(model)
    with pytest.raises(DeviceSpecError, match="ranges are fixed from training images"):
        MonteCarloEvaluator(model, parse_device("adc:bits=8"))


def test_monte_carlo_with_tiles_adc_and_differential_pairs():
    from sklearn.datasets import load_digits

    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    digits = load_digits()
    x = (digits.images / 16).astype(np.float32).reshape(-1, 1, 8, 8)
    train, test, y = x[:256], x[-300:], digits.target[-300:]
    clean = MonteCarloEvaluator(model, parse_device("lognormal:sigma=0")).clean_accuracy(test, y)
    exact = MonteCarloEvaluator(model, parse_device("tile:size=16+adc:bits=16+lognormal:sigma=0"), adc_images=train)
    assert exact.identical_chips and exact.evaluate(test, y, 3, 0).mean == pytest.approx(clean)
    coarse = MonteCarloEvaluator(model, parse_device("tile:size=16+adc:bits=2"), adc_images=train)
    assert coarse.evaluate(test, y, 2, 0).mean < clean - 0.05  # three levels per tile cost accuracy
    spec = "tile:size=16+adc:bits=6,noise=0.02+lognormal:sigma=0.4,mapping=differential"
    first = MonteCarloEvaluator(model, parse_device(spec), adc_images=train).chip_accuracies(test, y, 4, 0, progress=False)
    again = MonteCarloEvaluator(model, parse_device(spec), adc_images=train).chip_accuracies(test, y, 4, 0, progress=False)
    assert first == again and len(set(first)) > 1 and max(first) < clean + 0.02


@pytest.mark.parametrize("bad", ["adc:bits=0", "tile:size=0", "adc:bits=8,range=-1", "lognormal:sigma=0.5,mapping=pcm"])
def test_bad_crossbar_parameters_are_one_line_errors_with_exit_2(bad, capsys):
    from rrcompile.cli import main

    assert main(["evaluate", str(DIGITS_MODEL), "--quiet", "--device", bad, "--samples", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rrcompile: error: device '")


def test_compile_deploy_evaluate_calibrate_and_inspect_with_tiles_and_adcs(tmp_path, capsys):
    """The command line end to end: the deployed graph keeps its converters, and evaluate reads
    their ranges back instead of fixing them again (the compile's own numbers, chip for chip)."""
    import json

    from rrcompile.cli import main

    out, spec = tmp_path / "d.onnx", "tile:size=64+adc:bits=5+lognormal:sigma=0.5"
    assert main(["compile", str(DIGITS_MODEL), "--device", spec, "--no-lipschitz", "--no-noise-injection", "--no-rl",
                 "--rl-chips", "2", "--rl-images", "200", "--samples", "3", "--sigma-sweep", "", "--quiet",
                 "-o", str(out)]) == 0
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["hardware"]["adc"]["conversions_per_inference"] == 2698
    assert main(["evaluate", str(out), "--samples", "3", "--calibrate", "256", "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    for key in ("mean", "std", "worst"):
        assert evaluated[key] == report["after"][key] and evaluated["calibrated"][key] == report["calibrated"][key]
    assert main(["calibrate", str(out), "--chip", "0:1", "-o", str(tmp_path / "chip.onnx"), "--quiet"]) == 0
    chip = onnx.load(str(tmp_path / "chip.onnx"))
    assert sum(n.op_type == ADC for n in chip.graph.node) == 4 and len(chip.graph.input) == 1
    capsys.readouterr()
    assert main(["deploy", str(out), "-o", str(tmp_path / "again.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "crossbar tiles of 64x64" in printed and "total                              2,698" in printed
    assert "one more bit on every ADC costs" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "crossbar tiles of 64x64" in printed and "conversions / inference" in printed


def real_inputs(name: str, shape) -> np.ndarray:
    """16 inputs as the model expects them: MNIST test digits for the MNIST models (mnist-8 takes
    raw 0..255 pixels, lenet5_mnist normalized ones), random images where the data is not here."""
    if not name.startswith(("mnist", "lenet5")):
        return np.random.default_rng(0).random((16, *shape[1:]), np.float32)
    digits = load_data(f"mnist:{shared_path('mnist')}", "test").subset(16)
    preprocess = Preprocess.parse("1", "0", "1") if name == "mnist-8" else Preprocess.parse("255", "0.1307", "0.3081")
    return preprocess.apply(digits.x).reshape(16, *shape[1:])


@pytest.mark.shared
@pytest.mark.parametrize("name", sorted(REAL_MODELS))
def test_real_models_evaluate_with_the_new_devices(name):
    file, shape = REAL_MODELS[name]
    model = canonicalize(onnx.load(str(shared_path("models", file))))
    x = real_inputs(name, shape)
    clean = run(model, x)
    scale = max(1.0, np.abs(clean).max())
    assert np.abs(run(tiled(model, x, "tile:size=128"), x) - clean).max() <= 1e-5 * scale
    # a 16-bit ADC is not lossless: up to half a step of each tile's full scale per conversion,
    # carried through the layers. On what the models are made for (MNIST digits, each model's own
    # scaling), relative to max |y|: mnist-8 4.0e-5, lenet5_mnist (a Softmax head) 6e-13; on random
    # images (no CIFAR-10 here) cifar10_winml 2.5e-5. mnist-8 fed uniform noise in 0..1, far from
    # the 0..255 digits it expects, reached 2.0e-4: the converters' ranges then serve a signal the
    # biases dwarf
    exact = tiled(model, x, "tile:size=128+adc:bits=16")
    assert np.abs(run(exact, x) - clean).max() <= 1e-4 * scale
    device = parse_device("tile:size=128+adc:bits=8,noise=0.01+lognormal:sigma=0.5,mapping=differential")
    evaluator = MonteCarloEvaluator(model, device, adc_images=x[:8])
    labels = np.argmax(clean.reshape(len(x), -1), axis=1)
    accuracies = evaluator.chip_accuracies(x, labels, 2, 0, progress=False)
    assert all(0 <= a <= 1 for a in accuracies)
