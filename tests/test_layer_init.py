"""BlockSparseLinear initialization: reset_parameters, the meta device and to_empty."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sparsify import BlockSparseConfig, BlockSparseLinear, block_ell


def assert_initialized_like_a_fresh_linear(layer: BlockSparseLinear) -> None:
    block_ell.check_col_indices(layer.col_indices, layer.num_cols, "layer")  # in range, unique per row
    bound = 1 / math.sqrt(layer.in_features)  # nn.Linear's Kaiming-uniform bound for the weight and the bias
    assert layer.values.abs().max() <= bound
    assert layer.values.abs().max() > bound / 2  # drawn, not left at zero
    assert layer.values.std() > bound / 4
    if layer.bias is not None:
        assert layer.bias.abs().max() <= bound and layer.bias.abs().max() > 0
    assert torch.equal(layer.stats_probe, torch.zeros_like(layer.stats_probe))
    assert layer.stats_probe.dtype == torch.float32


def test_reset_parameters_gives_a_valid_topology_and_linear_like_values():
    layer = BlockSparseLinear(128, 64, block_size=16, density=0.5)
    with torch.no_grad():
        layer.values.fill_(7.0)
        layer.col_indices.zero_()  # a repeated column: invalid
        layer.stats_probe.fill_(3.0)
    layer.reset_parameters()
    assert_initialized_like_a_fresh_linear(layer)


def test_reset_parameters_repeats_under_the_config_seed():
    linear = nn.Linear(128, 64)
    config = BlockSparseConfig(density=0.5, block_size=16, init="random", seed=3)
    first, second = BlockSparseLinear.from_linear(linear, config=config), BlockSparseLinear.from_linear(linear, config=config)
    first.reset_parameters(), second.reset_parameters()
    assert torch.equal(first.col_indices, second.col_indices) and torch.equal(first.values, second.values)


@pytest.mark.parametrize("build", ["constructor", "from_linear"])
def test_a_layer_built_on_meta_initializes_itself_on_to_empty(build):
    with torch.device("meta"):
        if build == "constructor":
            layer = BlockSparseLinear(128, 64, block_size=16, density=0.25)
        else:
            layer = BlockSparseLinear.from_linear(nn.Linear(128, 64), block_size=16, density=0.25)
    assert layer.values.is_meta and layer.col_indices.is_meta
    assert layer.col_indices.shape == (4, 2)
    layer.to_empty(device="cpu")
    assert_initialized_like_a_fresh_linear(layer)
    x = torch.randn(3, 128)
    assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-6)


def test_a_layer_built_under_accelerates_init_empty_weights_initializes_itself_on_to_empty():
    accelerate = pytest.importorskip("accelerate")
    with accelerate.init_empty_weights():  # parameters on meta, buffers (col_indices) real zeros
        layer = BlockSparseLinear(128, 64, block_size=16, density=0.5)
    assert layer.values.is_meta and not layer.col_indices.is_meta
    layer.to_empty(device="cpu")
    assert_initialized_like_a_fresh_linear(layer)


def test_casting_a_materialized_layer_keeps_its_topology():
    layer = BlockSparseLinear(64, 32, block_size=16)
    before = layer.col_indices.clone()
    layer.to(torch.float64)  # an _apply that is not a materialization
    assert torch.equal(layer.col_indices, before)


def test_magnitude_topology_is_deferred_on_meta_and_chosen_from_the_drawn_weight():
    topology = block_ell.choose_topology(torch.empty(64, 128, device="meta"), 16, 0.5, "magnitude")
    assert topology.is_meta and topology.shape == (4, 4) and topology.dtype == torch.int32
