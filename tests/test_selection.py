"""The selection walk on plain PyTorch models: layer specs bounded by the model, shared modules,
weights other code reads, a linear at the root, components that match nothing, density rounding."""

import time
import warnings

import pytest
import torch
from torch import nn

from sparsify import BlockSparseLinear, densify, sparse_layers, sparsify, sparsity_table
from sparsify.api import skipped_layers
from sparsify.layer_spec import LayerSpan, parse_layers
from tests.test_errors import assert_refused


class Stack(nn.Module):
    """``layers.N.fc1 / fc2`` for N < depth, and a head."""

    def __init__(self, depth=4, width=64):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            nn.ModuleDict({"fc1": nn.Linear(width, 2 * width), "fc2": nn.Linear(2 * width, width)}) for _ in range(depth)
        )
        self.head = nn.Linear(width, 32)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer["fc2"](torch.relu(layer["fc1"](x)))
        return self.head(x)


@pytest.mark.parametrize("spec", ["0..1000000000000", range(10**12), range(0, 10**15, 3), "2..10000000"])
def test_a_huge_layer_spec_costs_what_the_model_costs_and_gives_a_short_message(spec):
    start = time.perf_counter()
    message = assert_refused(Stack(), r"do not exist; the model has layers 0\.\.3", layers=spec)
    assert time.perf_counter() - start < 2.0
    assert len(message) < 1000
    assert "in all)" in message  # the count of missing indices, not the indices


def test_a_huge_list_spec_gives_a_short_message():
    with pytest.raises(ValueError, match=r"layers \[4, 5, 6.*\] \(99996 in all\) do not exist") as error:
        sparsify(Stack(), layers=list(range(100_000)))
    assert len(str(error.value)) < 1000


def test_a_few_missing_layers_are_listed_one_by_one():
    with pytest.raises(ValueError, match=r"layers \[4, 7\] do not exist"):
        sparsify(Stack(), layers="3..4,7")


def test_layer_specs_parse_into_spans_not_lists():
    assert parse_layers("1,3,5..7") == (LayerSpan(1, 1), LayerSpan(3, 3), LayerSpan(5, 7))
    assert parse_layers("0..5,3..9") == (LayerSpan(0, 9),)  # overlapping spans are counted once
    assert parse_layers(range(10**12)) == (LayerSpan(0, 10**12 - 1),)
    assert parse_layers(range(9, 0, -3)) == (LayerSpan(3, 9, 3),)
    assert parse_layers([5, 1, 2, 3]) == (LayerSpan(1, 3), LayerSpan(5, 5))
    assert parse_layers("decoder.2..4") == (LayerSpan(2, 4, 1, "decoder"),)


def test_a_negative_range_lists_only_a_few_negative_indices():
    with pytest.raises(ValueError, match=r"negative indices \[-1000000, -999999.*\] \(1000000 in all\)"):
        sparsify(Stack(), layers=range(-10**6, 2))


def test_a_model_that_is_itself_a_linear_is_refused_with_what_to_do_instead():
    linear = nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"the model is itself a Linear.*BlockSparseLinear\.from_linear.*nn\.Sequential"):
        sparsify(linear)
    assert isinstance(sparsify(nn.Sequential(linear))[0], BlockSparseLinear)
    sparse = BlockSparseLinear(64, 64)
    assert sparsify(sparse) is sparse  # already sparse: nothing to do, as for sparse layers inside a model


def test_mlp_on_linears_without_a_layer_index_says_why_it_matched_nothing():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp_in, self.mlp_out = nn.Linear(64, 128), nn.Linear(128, 64)

    with pytest.raises(ValueError, match=r"components='mlp' matched no linear: .*no linear of this model sits in a "
                                         r"numbered nn\.ModuleList / nn\.Sequential; name the linears instead") as error:
        sparsify(Flat(), components="mlp")
    assert "unknown component" not in str(error.value)


def test_a_module_registered_at_two_paths_becomes_one_sparse_module_at_both_and_densifies_back_to_one():
    model = Stack()
    model.layers[3]["fc1"] = model.layers[1]["fc1"]  # one linear, two paths
    x = torch.randn(5, 64)
    sparsify(model, layers=1, components="fc1", density=0.5)
    assert isinstance(model.layers[1]["fc1"], BlockSparseLinear)
    assert model.layers[3]["fc1"] is model.layers[1]["fc1"]
    expected = model(x)
    densify(model)
    assert isinstance(model.layers[3]["fc1"], nn.Linear) and model.layers[3]["fc1"] is model.layers[1]["fc1"]
    assert torch.allclose(model(x), expected, atol=1e-6)


def test_a_linear_whose_weight_is_shared_with_another_module_is_skipped_and_reported():
    model = Stack()
    model.layers[2]["fc1"].weight = model.layers[0]["fc1"].weight  # two modules, one weight
    with pytest.warns(UserWarning, match=r"left dense: layers\.0\.fc1: its weight is tied to layers\.2\.fc1\.weight"):
        sparsify(model, components="fc1")
    assert {name for name, _ in sparse_layers(model)} == {"layers.1.fc1", "layers.3.fc1"}
    assert model.layers[0]["fc1"].weight is model.layers[2]["fc1"].weight  # still tied
    assert {s.fqn for s in skipped_layers(model)} == {"layers.0.fc1", "layers.2.fc1"}
    assert "left dense: layers.2.fc1: its weight is tied to layers.0.fc1.weight" in sparsity_table(model)


def test_selecting_only_tied_linears_is_refused_and_changes_nothing():
    model = Stack()
    model.head.weight = nn.Parameter(torch.randn(32, 64))
    model.layers[0]["fc2"].weight = nn.Parameter(torch.randn(64, 128))
    model.extra = nn.Linear(64, 32)
    model.extra.weight = model.head.weight
    assert_refused(model, r"every selected linear must stay dense: head: its weight is tied to extra\.weight", components="head")


def test_multihead_attention_out_proj_stays_dense_with_the_reason():
    model = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), num_layers=2)
    with pytest.warns(UserWarning, match=r"layers\.0\.self_attn\.out_proj: nn\.MultiheadAttention reads out_proj\.weight"):
        sparsify(model, density=0.5)
    assert {name.rsplit(".", 1)[-1] for name, _ in sparse_layers(model)} == {"linear1", "linear2"}
    assert torch.isfinite(model(torch.randn(2, 5, 64))).all()


def test_rounded_density_is_warned_about_naming_the_layers_and_shown_in_the_table():
    model = Stack()
    with pytest.warns(UserWarning, match=r"density=0\.1 was requested.*gives layers\.0\.fc1 0\.250 \(1/4 blocks\)") as record:
        sparsify(model, layers=0, density=0.1)
    assert not any("fc2" in str(w.message) for w in record)  # 1/8 is within 0.05 of 0.1
    table = sparsity_table(model)
    assert "density asked" in table and "density used" in table
    assert "| 0.100 " in table and "| 0.250 " in table and "| 0.125 " in table


def test_a_density_that_rounds_exactly_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsify(Stack(), layers=0, density=0.5)
