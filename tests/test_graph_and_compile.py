"""The FX pass on symbolic_trace and torch.export graphs, torch.export of a sparse model, torch.compile."""

import copy

import pytest
import torch
import torch._dynamo
from torch import nn

from sparsify import BlockSparseLinear, sparse_layers, sparsify
from tests.conftest import model_output, relative_error, tiny_llama

OP = torch.ops.sparsify.block_ell_linear.default


class Stack(nn.Module):
    def __init__(self, width=64, hidden=128, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(width, hidden), "fc2": nn.Linear(hidden, width, bias=False)}) for _ in range(depth)
        )
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["fc2"](torch.relu(layer["fc1"](x)))
        return self.head(x)


def op_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == OP]


def test_symbolic_trace_pass_matches_the_module_path():
    model = Stack()
    x = torch.randn(5, 64)
    expected = sparsify(copy.deepcopy(model), layers="1..2", components=("*.fc1", "fc2"), density=0.5)(x)
    gm = sparsify(torch.fx.symbolic_trace(model), layers="1..2", components=("*.fc1", "fc2"), density=0.5)
    assert len(op_nodes(gm)) == 4
    assert isinstance(gm.get_submodule("layers.1.fc1"), BlockSparseLinear)
    assert torch.equal(gm(x), expected)


def test_export_graph_pass_matches_the_module_path_on_llama(token_ids):
    model = tiny_llama()
    expected = model_output(sparsify(copy.deepcopy(model), layers="1..2", components="mlp", density=0.5), token_ids)
    gm = torch.export.export(model, (token_ids,), strict=False).module()
    linears_before = sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default)
    gm = sparsify(gm, layers="1..2", components="mlp", density=0.5)
    assert len(op_nodes(gm)) == 6
    assert sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.linear.default) == linears_before - 6
    out = gm(token_ids)
    out = out.logits if hasattr(out, "logits") else out[0]
    assert relative_error(out, expected) < 1e-6


def test_graph_pass_state_dict_uses_the_module_names():
    gm = sparsify(torch.fx.symbolic_trace(Stack()), layers=0, components="fc1")
    keys = gm.state_dict().keys()
    assert "layers.0.fc1.values" in keys and "layers.0.fc1.col_indices" in keys and "layers.0.fc1.weight" not in keys


def test_torch_export_of_a_sparse_model_contains_the_op():
    model = sparsify(Stack(), components="fc1", density=0.5)
    program = torch.export.export(model, (torch.randn(4, 64),))
    assert sum(1 for n in program.graph.nodes if n.target == OP) == 3
    x = torch.randn(4, 64)
    assert torch.allclose(program.module()(x), model(x))


def test_compile_fullgraph_mlp_matches_eager_and_does_not_recompile_on_new_topology():
    torch._dynamo.reset()
    model = sparsify(Stack(), components=("fc1", "fc2"), density=0.5)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    x = torch.randn(7, 64)
    assert relative_error(compiled(x), model(x)) < 1e-6
    layer = model.layers[0]["fc1"]
    with torch.no_grad():
        layer.col_indices.copy_(torch.roll(layer.col_indices, 1, dims=1))  # a new topology, same shape
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert relative_error(compiled(x), model(x)) < 1e-6


def test_compile_trains_with_gradients_equal_to_eager():
    torch._dynamo.reset()
    eager = sparsify(Stack(), components="fc1", density=0.5)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(6, 64)
    eager(x).pow(2).sum().backward()
    compiled(x).pow(2).sum().backward()
    for (_, a), (_, b) in zip(sparse_layers(eager), sparse_layers(compiled_model)):
        assert relative_error(b.values.grad, a.values.grad) < 1e-5


def test_sparsify_adds_no_graph_break_to_llama(token_ids):
    torch._dynamo.reset()
    dense = tiny_llama()
    sparse = sparsify(copy.deepcopy(dense), layers="1..2", components="mlp", density=0.5)
    dense_breaks = torch._dynamo.explain(dense)(token_ids).graph_break_count
    torch._dynamo.reset()
    sparse_breaks = torch._dynamo.explain(sparse)(token_ids).graph_break_count
    assert sparse_breaks == dense_breaks
    torch._dynamo.reset()
    compiled = torch.compile(sparse)
    assert relative_error(model_output(compiled, token_ids), model_output(sparse, token_ids)) < 1e-5


def test_graph_pass_rewrites_a_linear_fed_straight_by_another_linear():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    expected = sparsify(copy.deepcopy(model), density=0.5)(x)
    gm = sparsify(torch.fx.symbolic_trace(model), density=0.5)
    assert len(op_nodes(gm)) == 2
    assert torch.equal(gm(x), expected)


def test_export_graph_pass_leaves_a_tied_lm_head_dense_and_the_embedding_working(token_ids):
    model = tiny_llama()
    model.lm_head.weight = model.model.embed_tokens.weight  # what tie_word_embeddings=True does
    gm = torch.export.export(model, (token_ids,), strict=False).module()
    with pytest.warns(UserWarning, match=r"left dense: lm_head: its weight is tied to"):
        gm = sparsify(gm, density=1.0)
    assert "lm_head" not in {name for name, _ in sparse_layers(gm)}
    out = gm(token_ids)
    out = out.logits if hasattr(out, "logits") else out[0]
    assert relative_error(out, model_output(model, token_ids)) < 1e-5
