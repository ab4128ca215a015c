"""Fine-tuning: the penalty shrinks, accuracy holds, the written model is the trained module."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DIGITS_MODEL, run
from graph_builders import make_model
from onnx import TensorProto, helper, numpy_helper

from rrcompile.data import load_data
from rrcompile.devices import parse_device
from rrcompile.evaluate import accuracy
from rrcompile.finetune import FinetuneConfig, finetune, logits_model, split_validation
from rrcompile.graph import analog_layers
from rrcompile.lipschitz import LipschitzPenalty
from rrcompile.pipeline import canonicalize
from rrcompile.torch_graph import TorchGraph


@pytest.fixture(scope="module")
def digits():
    model = canonicalize(onnx.load(str(DIGITS_MODEL)))
    train, test = load_data("digits", "train"), load_data("digits", "test")
    return model, train.x / np.float32(255), train.y, test.x / np.float32(255), test.y


def penalty_of(model, penalty: LipschitzPenalty) -> float:
    module = TorchGraph(model)
    return float(penalty([(layer, module.weight(layer)) for layer in analog_layers(model)]).detach())


def test_one_epoch_of_lipschitz_fine_tuning_lowers_the_penalty_and_keeps_accuracy(digits):
    model, x, y, x_test, y_test = digits
    penalty = LipschitzPenalty(beta=0.01, form="orthogonal")
    result = finetune(model, x, y, FinetuneConfig(epochs=1, lipschitz=penalty), progress=False)
    assert penalty_of(result.model, penalty) < 0.9 * penalty_of(model, penalty)
    assert result.spectral_after.product < result.spectral_before.product
    assert accuracy(result.model, x_test, y_test) >= accuracy(model, x_test, y_test) - 0.02
    assert [log.epoch for log in result.history] == [0, 1] and result.best_epoch == 1


def test_fine_tuning_is_seeded_and_keeps_the_graph(digits):
    model, x, y, _, _ = digits
    config = FinetuneConfig(epochs=1, noise_injection=parse_device("lognormal:sigma=0.3"),
                            validation_device=parse_device("lognormal:sigma=0.3"), validation_chips=2, seed=3)
    first = finetune(model, x[:400], y[:400], config, progress=False)
    second = finetune(model, x[:400], y[:400], config, progress=False)
    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert [n.name for n in first.model.graph.node] == [n.name for n in model.graph.node]
    assert first.model.graph.input == model.graph.input and first.model.graph.output == model.graph.output
    assert first.history[1].varied_val is not None


def test_validation_split_is_seeded_and_disjoint():
    x, y = np.arange(100, dtype=np.float32)[:, None], np.arange(100)
    x_train, y_train, x_val, y_val = split_validation(x, y, 0.2, seed=1)
    assert len(y_val) == 20 and not set(y_train) & set(y_val)
    assert np.array_equal(split_validation(x, y, 0.2, seed=1)[3], y_val)


def test_softmax_head_is_left_out_for_training_only():
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["z"], name="fc", transB=1),
         helper.make_node("Softmax", ["z"], ["p"], name="softmax", axis=-1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 2])],
        [onnx.numpy_helper.from_array(np.ones((2, 3), np.float32), "w")])
    model = make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    logits = logits_model(model)
    assert [n.op_type for n in logits.graph.node] == ["Gemm"] and logits.graph.output[0].name == "z"
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Softmax"]
    x = np.random.default_rng(0).random((4, 3), dtype=np.float32)
    np.testing.assert_allclose(run(logits, x), x @ np.ones((3, 2), np.float32), rtol=1e-6)


def test_noise_injection_on_tiles_and_adcs_trains_every_weight_and_bias(digits):
    from rrcompile.crossbar import with_adc_ranges

    model, x, y, _, _ = digits
    device = with_adc_ranges(model, parse_device("tile:size=32+adc:bits=6,noise=0.01+lognormal:sigma=0.3"), x[:256])
    result = finetune(model, x[:400], y[:400], FinetuneConfig(epochs=1, noise_injection=device, validation_device=device,
                                                             validation_chips=2, seed=1, clean_tolerance=1.0), progress=False)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    # a tiled layer's bias is added after its tiles' sum: trained all the same (the ADC's straight-through gradient)
    learned = [name for layer in analog_layers(model) for name in (layer.weight, layer.bias)]
    assert result.best_epoch == 1 and all(not np.array_equal(before[n], after[n]) for n in learned)
    assert [n.name for n in result.model.graph.node] == [n.name for n in model.graph.node]
