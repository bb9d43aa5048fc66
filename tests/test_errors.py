"""Every bad input gives a ValueError that names the layer, the value and the fix; the model is untouched."""

import copy

import pytest
import torch
from torch import nn

from sparsify import BlockSparseLinear, sparse_layers, sparsify
from tests.conftest import tiny_llama


def snapshot(model: nn.Module):
    return [(name, type(m).__name__) for name, m in model.named_modules()], copy.deepcopy(model.state_dict())


def assert_unchanged(model: nn.Module, before) -> None:
    modules, state = snapshot(model)
    assert modules == before[0]
    assert state.keys() == before[1].keys()
    assert all(torch.equal(state[k], before[1][k]) for k in state)


def assert_refused(model: nn.Module, match: str, **kwargs) -> str:
    """``sparsify(model, **kwargs)`` raises a ValueError matching ``match`` and leaves the model as it
    was; returns the message."""
    before = snapshot(model)
    with pytest.raises(ValueError, match=match) as error:
        sparsify(model, **kwargs)
    assert_unchanged(model, before)
    return str(error.value)


class OddWidth(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 40)) for _ in range(2)])

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"density": 0.0}, r"density=0\.0 is outside \(0, 1\]"),
        ({"density": 1.5}, r"density=1\.5 is outside"),
        ({"density": float("nan")}, r"density=nan"),
        ({"density": "half"}, r"density='half' must be a number"),
        ({"block_size": 0}, r"block_size=0 must be a positive integer"),
        ({"block_size": 48}, r"model\.layers\.\d+\.\w+\.\w+: \w+_features=\d+ is not divisible by block_size=48; choose a block_size"),
        ({"init": "best"}, r"init='best' is not one of"),
        ({"layers": "8..12"}, r"layers \[8, 9, 10, 11, 12\] do not exist; the model has layers 0\.\.3"),
        ({"layers": "3..1"}, r"range 3\.\.1 is empty"),
        ({"layers": "1-2"}, r"layers='1-2' is not understood"),
        ({"layers": "__import__('os')"}, r"is not understood"),
        ({"layers": -1}, r"negative indices"),
        ({"layers": 1.5}, r"not a layer selector"),
        ({"components": "ffn_in"}, r"unknown component 'ffn_in'.*linear names \['down_proj', 'gate_proj'"),
        ({"components": ()}, r"must be non-empty strings"),
        ({"filter_fn": lambda module, fqn: False}, r"match no linear; the model has layers 0\.\.3"),
    ],
)
def test_bad_input_raises_a_clear_error_and_leaves_the_model_untouched(kwargs, message):
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        sparsify(model, **kwargs)
    assert_unchanged(model, before)


def test_one_bad_layer_among_good_ones_changes_nothing():
    model = OddWidth()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layers\.0\.1: out_features=40 is not divisible by block_size=16"):
        sparsify(model, density=0.5, block_size=16)
    assert_unchanged(model, before)
    assert not sparse_layers(model)


def test_load_state_dict_rejects_out_of_range_topology():
    model = sparsify(tiny_llama(), layers=1, components="up_proj")
    state = model.state_dict()
    state["model.layers.1.mlp.up_proj.col_indices"][0, 0] = 99
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj: col_indices hold values in \[\d+, 99\]"):
        model.load_state_dict(state)


def test_load_state_dict_rejects_a_repeated_column():
    model = sparsify(tiny_llama(), layers=1, components="up_proj")
    state = model.state_dict()
    topology = state["model.layers.1.mlp.up_proj.col_indices"]
    topology[3, 1] = topology[3, 0]
    with pytest.raises(ValueError, match="block-row 3 repeats a column"):
        model.load_state_dict(state)


def test_load_state_dict_rejects_a_topology_of_another_density():
    dense_ish = sparsify(tiny_llama(), layers=1, components="up_proj", density=0.75)
    sparse = sparsify(tiny_llama(), layers=1, components="up_proj", density=0.25)
    with pytest.raises(ValueError, match="same density and block_size"):
        sparse.load_state_dict(dense_ish.state_dict())


def test_constructor_rejects_indivisible_width():
    with pytest.raises(ValueError, match=r"in_features=30 is not divisible by block_size=16"):
        BlockSparseLinear(30, 32, block_size=16)
