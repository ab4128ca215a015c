"""Analog layers (also in a varied model) and the networkx view: per-layer attributes the RL agent walks."""
from __future__ import annotations

import networkx as nx
from graph_builders import QUIRK_MODELS

from rrcompile.devices import parse_device
from rrcompile.graph import analog_layers, to_networkx
from rrcompile.passes.insert_variation import InsertVariationPass
from rrcompile.pipeline import canonicalize


def test_networkx_view_has_layer_attributes():
    model = canonicalize(QUIRK_MODELS["cntk_conv_add_matmul"]()[0])
    view = to_networkx(model)
    assert nx.is_directed_acyclic_graph(view)
    assert list(nx.topological_sort(view)) == ["conv", "relu", "pool", "flatten", "fc"]
    conv, fc = view.nodes["conv"], view.nodes["fc"]
    assert conv["analog"] and conv["op"] == "Conv" and conv["weight_shape"] == (4, 1, 3, 3)
    assert conv["params"] == 36 and conv["macs"] == 8 * 8 * 4 * 9  # SAME padding keeps 8x8, 4 channels, 9 taps
    assert fc["macs"] == 64 * 5 and fc["crossbar"] == (64, 5)
    assert (conv["depth"], conv["analog_depth"], fc["depth"], fc["analog_depth"]) == (0, 1, 4, 2)
    assert not view.nodes["relu"]["analog"]
    assert view.edges["conv", "relu"]["tensor"] == "a1"  # the fused Conv writes what the bias Add wrote


def test_crossbar_tiles_follow_gemm_orientation():
    model = canonicalize(QUIRK_MODELS["torch_fixed_batch_softmax"]()[0])
    gemm = next(layer for layer in analog_layers(model) if layer.weight == "W2")
    assert (gemm.rows, gemm.cols) == (48, 6)  # transB=1: weight stored [out, in]
    assert gemm.tiles(32) == 2 and gemm.tiles(128) == 1


def test_analog_layers_see_through_variation_chains():
    model = canonicalize(QUIRK_MODELS["torch_fixed_batch_softmax"]()[0])
    varied = InsertVariationPass(parse_device("quantize:levels=8+lognormal:sigma=0.5"))(model).model
    assert analog_layers(varied) == analog_layers(model)  # same layers, weight = the target initializer
    assert next(n for n in varied.graph.node if n.name == "Gemm_5").input[1] == "Gemm_5.lognormal"
