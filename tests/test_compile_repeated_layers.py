"""compile_repeated_layers: which modules it compiles, that the compiled model computes what the eager one
does, and its error for a model without sparse repeated layers (CPU, the "eager" backend: the choice of
modules is under test here, the kernels' compilation elsewhere)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsify import compile_repeated_layers, sparsify


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(32, 64)
        self.down = nn.Linear(64, 32)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    def __init__(self, layers=3):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(layers))
        self.head = nn.Linear(32, 8)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def test_the_layers_holding_sparse_linears_are_compiled_and_compute_the_same():
    torch.manual_seed(0)
    model = sparsify(Stack(), layers="1..2", components=("up", "down"), density=0.5, block_size=16)
    eager = copy.deepcopy(model)
    names = compile_repeated_layers(model, mode=None, backend="eager")
    assert names == ["layers.1", "layers.2"]
    assert model.layers[0]._compiled_call_impl is None and model.layers[1]._compiled_call_impl is not None
    x = torch.randn(5, 32)
    assert torch.allclose(model(x), eager(x), atol=1e-6)


def test_a_model_without_sparse_repeated_layers_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="has no nn.ModuleList whose layers hold a BlockSparseLinear; run sparsify"):
        compile_repeated_layers(Stack(), mode=None, backend="eager")
