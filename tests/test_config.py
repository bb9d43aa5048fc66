"""BlockSparseConfig: validated once, JSON round trip, and stored on every layer each entry point makes."""

import json

import pytest
import torch
from torch import nn

from sparsify import BlockSparseConfig, BlockSparseLinear, sparse_layers, sparsify
from sparsify.passes import sparsify_graph
from sparsify.rewrite import to_block_sparse
from sparsify.select import make_target
from tests.conftest import tiny_llama


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


CONFIG = BlockSparseConfig(density=0.25, block_size=16, init="random", seed=7)


def test_to_dict_round_trips_through_json():
    text = json.dumps(CONFIG.to_dict())
    assert json.loads(text)["version"] == BlockSparseConfig.VERSION
    assert BlockSparseConfig.from_dict(json.loads(text)) == CONFIG


def test_from_dict_refuses_a_newer_version_and_unknown_fields():
    with pytest.raises(ValueError, match="newer than this library reads"):
        BlockSparseConfig.from_dict({**CONFIG.to_dict(), "version": BlockSparseConfig.VERSION + 1})
    with pytest.raises(ValueError, match=r"unknown fields \['sparsity'\]"):
        BlockSparseConfig.from_dict({**CONFIG.to_dict(), "sparsity": 0.5})


def test_sparsify_stores_its_config_on_every_layer_it_makes():
    model = sparsify(tiny_llama(), CONFIG, layers="1..2", components="mlp")
    assert {layer.config for _, layer in sparse_layers(model)} == {CONFIG}


def test_keywords_override_the_config_and_are_what_the_layers_store():
    model = sparsify(tiny_llama(), CONFIG, layers=1, components="up_proj", density=0.5)
    (_, layer), = sparse_layers(model)
    assert layer.config == BlockSparseConfig(density=0.5, block_size=16, init="random", seed=7)
    assert layer.blocks_per_row == 2


def test_keywords_alone_keep_working_and_match_the_same_config():
    by_keywords = sparsify(tiny_llama(), layers=1, components="mlp", density=0.25, init="random", seed=7)
    by_config = sparsify(tiny_llama(), CONFIG, layers=1, components="mlp")
    for (_, a), (_, b) in zip(sparse_layers(by_keywords), sparse_layers(by_config)):
        assert a.config == b.config and torch.equal(a.col_indices, b.col_indices)


def test_graph_pass_stores_its_config_on_every_layer_it_makes():
    gm = sparsify_graph(torch.fx.symbolic_trace(Stack()), CONFIG)
    assert {layer.config for _, layer in sparse_layers(gm)} == {CONFIG}


def test_to_block_sparse_and_from_linear_store_the_config():
    linear = nn.Linear(64, 32)
    (layer,) = to_block_sparse([make_target("fc", linear)], CONFIG)
    assert layer.config == CONFIG
    assert BlockSparseLinear.from_linear(linear, config=CONFIG).config == CONFIG
    assert BlockSparseLinear.from_linear(linear, 16, 0.5).config == BlockSparseConfig(density=0.5, block_size=16)


@pytest.mark.parametrize("bad", [0.5, {"density": 0.5}, "magnitude"])
def test_a_config_that_is_not_a_block_sparse_config_says_what_to_pass(bad):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"is not a BlockSparseConfig; pass BlockSparseConfig\(density=\.\.\."):
        sparsify(model, bad)
    assert not sparse_layers(model)


def test_config_validates_every_field_once_with_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"density=0\.0 is outside \(0, 1\]; pass the fraction"):
        BlockSparseConfig(density=0.0)
    with pytest.raises(ValueError, match=r"block_size=0 must be a positive integer"):
        BlockSparseConfig(block_size=0)
    with pytest.raises(ValueError, match=r"init='best' is not one of"):
        BlockSparseConfig(init="best")
    with pytest.raises(ValueError, match=r"seed='1' must be an integer or None"):
        BlockSparseConfig(seed="1")
