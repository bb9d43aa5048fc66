"""sparsify() on tiny HF models built from configs: what gets rewritten and what the numbers are."""

import copy

import pytest
import torch
from torch import nn

from sparsify import BlockSparseLinear, block_ell, densify, sparse_layers, sparsify, sparsity_table
from sparsify.integrations.transformers import is_conv1d, linear_weight
from tests.conftest import TINY_MODELS, model_output, relative_error, tiny_gpt2, tiny_llama

# MLP linears per layer: Llama gate/up/down, GPT-2 c_fc/c_proj, OPT fc1/fc2, BERT intermediate/output.
MLP_PER_LAYER = {"llama": 3, "gpt2": 2, "opt": 2, "bert": 2}
MLP_NAMES = {
    "llama": {"gate_proj", "up_proj", "down_proj"},
    "gpt2": {"c_fc", "c_proj"},
    "opt": {"fc1", "fc2"},
    "bert": {"dense"},
}


def masked_dense_copy(original: nn.Module, sparse_model: nn.Module) -> nn.Module:
    """An independent dense model whose selected weights are zeroed outside the kept blocks."""
    dense = copy.deepcopy(original)
    for name, layer in sparse_layers(sparse_model):
        module = dense.get_submodule(name)
        mask = block_ell.dense_mask(layer.col_indices, layer.num_cols, layer.block_size)
        with torch.no_grad():
            module.weight.mul_(mask.t() if is_conv1d(module) else mask)
    return dense


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_layers_1_to_2_mlp_rewrites_exactly_the_middle_mlps(arch):
    model = TINY_MODELS[arch]()
    sparsify(model, layers="1..2", components=("mlp",), density=0.5, block_size=16)
    rewritten = sparse_layers(model)
    assert len(rewritten) == 2 * MLP_PER_LAYER[arch]
    for name, _ in rewritten:
        assert any(f".{i}." in name for i in (1, 2))
        assert name.rsplit(".", 1)[-1] in MLP_NAMES[arch]
        assert "attention" not in name and "attn" not in name


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_density_one_gives_the_original_logits(arch, token_ids):
    original = TINY_MODELS[arch]()
    expected = model_output(original, token_ids)
    sparse = sparsify(copy.deepcopy(original), layers="0..3", density=1.0, block_size=16)
    assert len(sparse_layers(sparse)) > 0
    assert relative_error(model_output(sparse, token_ids), expected) < 1e-5


@pytest.mark.parametrize("arch", sorted(TINY_MODELS))
def test_half_density_equals_an_independently_masked_dense_copy(arch, token_ids):
    original = TINY_MODELS[arch]()
    sparse = sparsify(copy.deepcopy(original), layers="1..2", components="mlp", density=0.5, block_size=16)
    masked = masked_dense_copy(original, sparse)
    out = model_output(sparse, token_ids)
    assert relative_error(out, model_output(masked, token_ids)) < 1e-5
    assert relative_error(out, model_output(original, token_ids)) > 1e-3  # sparsity really changed something


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_values_grad_equals_masked_dense_weight_grad_at_kept_blocks(arch, token_ids):
    original = TINY_MODELS[arch]()
    sparse = sparsify(copy.deepcopy(original), layers="1..2", components="mlp", density=0.5, block_size=16)
    masked = masked_dense_copy(original, sparse)
    model_output(sparse, token_ids).pow(2).mean().backward()
    model_output(masked, token_ids).pow(2).mean().backward()
    for name, layer in sparse_layers(sparse):
        dense_grad = linear_weight(masked.get_submodule(name)).grad if not is_conv1d(masked.get_submodule(name)) \
            else masked.get_submodule(name).weight.grad.t()
        expected = block_ell.gather_blocks(dense_grad, layer.col_indices, layer.block_size)
        assert relative_error(layer.values.grad, expected) < 1e-5, name


def test_gpt2_conv1d_weights_are_read_transposed(token_ids):
    model = tiny_gpt2()
    conv = model.transformer.h[1].mlp.c_fc
    sparse = sparsify(model, layers=1, components="c_fc", density=1.0, block_size=16)
    layer = sparse.transformer.h[1].mlp.c_fc
    assert (layer.in_features, layer.out_features) == (conv.weight.shape[0], conv.weight.shape[1])
    assert torch.equal(layer.to_dense(), conv.weight.t())


def test_magnitude_init_carries_the_original_weights():
    model = tiny_llama()
    weight = model.model.layers[2].mlp.up_proj.weight.detach().clone()
    sparsify(model, layers=2, components="up_proj", density=0.25, block_size=16)
    layer = model.model.layers[2].mlp.up_proj
    norms = block_ell.block_norms(weight, 16)
    kept = norms.gather(1, layer.col_indices.long())
    dropped_max = norms.masked_fill(block_ell.block_mask(layer.col_indices, layer.num_cols), -1).max(dim=1).values
    assert bool((kept.min(dim=1).values >= dropped_max).all())
    assert torch.equal(layer.to_dense(), weight * block_ell.dense_mask(layer.col_indices, layer.num_cols, 16))


@pytest.mark.parametrize(
    "components, expected",
    [("attn", {"q_proj", "k_proj", "v_proj", "o_proj"}), ("up_proj", {"up_proj"}), (("*.gate_proj", "down_proj"), {"gate_proj", "down_proj"})],
)
def test_component_selectors(components, expected):
    model = sparsify(tiny_llama(), layers=[0, 3], components=components, density=0.5)
    names = {name.rsplit(".", 1)[-1] for name, _ in sparse_layers(model)}
    assert names == expected
    assert {name.split(".")[2] for name, _ in sparse_layers(model)} == {"0", "3"}


def test_filter_fn_narrows_the_selection():
    model = sparsify(tiny_llama(), components="mlp", filter_fn=lambda module, fqn: module.out_features == 128)
    assert {name.rsplit(".", 1)[-1] for name, _ in sparse_layers(model)} == {"gate_proj", "up_proj"}


def test_repeated_calls_give_per_group_densities_and_leave_sparse_layers_alone():
    model = tiny_llama()
    sparsify(model, layers="0..1", components="mlp", density=0.25)
    first = model.model.layers[0].mlp.up_proj
    sparsify(model, layers="0..3", components="mlp", density=0.75)
    assert model.model.layers[0].mlp.up_proj is first and first.density == 0.25
    assert model.model.layers[3].mlp.up_proj.density == 0.75


def test_random_init_with_seed_is_reproducible():
    a = sparsify(tiny_llama(), components="mlp", init="random", seed=3)
    b = sparsify(tiny_llama(), components="mlp", init="random", seed=3)
    for (_, la), (_, lb) in zip(sparse_layers(a), sparse_layers(b)):
        assert torch.equal(la.col_indices, lb.col_indices)


def test_state_dict_round_trips_into_a_freshly_sparsified_model(token_ids):
    trained = sparsify(tiny_llama(seed=1), layers="1..2", components="mlp", init="random", seed=1)
    fresh = sparsify(tiny_llama(seed=2), layers="1..2", components="mlp", init="random", seed=2)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(model_output(fresh, token_ids), model_output(trained, token_ids))
    assert "model.layers.1.mlp.up_proj.stats_probe" not in trained.state_dict()


def test_densify_restores_plain_linears_with_the_same_outputs(token_ids):
    model = sparsify(tiny_llama(), layers="1..2", components="mlp")
    expected = model_output(model, token_ids)
    densify(model)
    assert not sparse_layers(model)
    assert isinstance(model.model.layers[1].mlp.up_proj, nn.Linear)
    assert relative_error(model_output(model, token_ids), expected) < 1e-6


def test_to_dtype_and_bfloat16_forward(token_ids):
    model = sparsify(tiny_llama(), layers="1..2", components="mlp").to(torch.bfloat16)
    layer = model.model.layers[1].mlp.up_proj
    assert layer.values.dtype == torch.bfloat16 and layer.col_indices.dtype == torch.int32
    assert model_output(model, token_ids).dtype == torch.bfloat16


def test_sparsity_table_lists_each_layer_with_density_and_savings():
    model = sparsify(tiny_llama(), layers="1..2", components="mlp", density=0.5)
    table = sparsity_table(model)
    assert table.count("mlp.") == 6 and "0.500" in table and "saved" in table
    assert "model.layers.1.mlp.down_proj" in table


def test_block_sparse_linear_constructor_and_to_dense_agree():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    assert layer.values.shape == (2, 2, 16, 16) and layer.col_indices.shape == (2, 2)
    x = torch.randn(5, 64)
    assert relative_error(layer(x), x @ layer.to_dense().t() + layer.bias) < 1e-6
