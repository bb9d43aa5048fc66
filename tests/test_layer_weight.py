"""``BlockSparseLinear.weight``: a read-only dense view for code that reads ``module.weight``, and the
dense views (``to_dense``, ``.weight``, ``densify``) agreeing with the layer's output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sparsify import BlockSparseLinear, TopologyConfig, TopologyOptimizer, densify, sparsify, sparse_layers


def test_weight_is_the_dense_view_and_its_gradient_reaches_values():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5).double()
    assert torch.equal(layer.weight, layer.to_dense())
    x = torch.randn(5, 64, dtype=torch.float64)
    (x @ layer.weight.T).square().sum().backward()
    via_view = layer.values.grad.clone()
    layer.values.grad = None
    layer(x).sub(layer.bias).square().sum().backward()
    assert torch.allclose(via_view, layer.values.grad)


def test_weight_is_not_a_parameter_buffer_or_state_dict_entry():
    layer = BlockSparseLinear(64, 32, block_size=16)
    assert [name for name, _ in layer.named_parameters()] == ["values", "bias"]
    assert "weight" not in layer.state_dict() and "weight" not in dict(layer.named_buffers())
    with torch.no_grad():
        layer.weight.fill_(5.0)  # writes a temporary
    assert not torch.equal(layer.to_dense(), torch.full((32, 64), 5.0))
    with pytest.raises((AttributeError, KeyError)):
        layer.weight = nn.Parameter(torch.zeros(32, 64))


def test_topology_optimizer_and_densify_see_only_values():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)), block_size=16, density=0.5)
    opt = TopologyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                            TopologyConfig(score_every=1, update_every=1, prune_fraction=0.5, swap_threshold=1.0))
    for _ in range(3):
        model(torch.randn(8, 64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    layers = dict(sparse_layers(model))
    dense_weights = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    densify(model)
    for name, weight in dense_weights.items():
        assert torch.equal(model.get_submodule(name).weight, weight)


def test_multihead_attention_with_a_sparse_out_proj_matches_the_densified_reference():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(64, 4, batch_first=True)
    mha.out_proj = BlockSparseLinear.from_linear(mha.out_proj, block_size=16, density=0.5)
    reference = copy.deepcopy(mha)
    reference.out_proj = mha.out_proj.to_linear()
    x = torch.randn(2, 7, 64)
    out, _ = mha(x, x, x)
    ref, _ = reference(x, x, x)
    assert torch.allclose(out, ref, atol=1e-6)
    out.square().sum().backward()
    assert mha.out_proj.values.grad is not None and mha.out_proj.values.grad.abs().sum() > 0


def test_t5_with_sparse_mlps_trains_a_step():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=128, d_model=64, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=16,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    model = sparsify(T5ForConditionalGeneration(config), components=("wi", "wo"), block_size=16, density=0.5)
    assert len(sparse_layers(model)) == 8  # wi and wo of 2 encoder and 2 decoder blocks
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(2, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    before = {name: layer.values.detach().clone() for name, layer in sparse_layers(model)}
    loss = model(input_ids=ids, labels=ids).loss  # T5's MLP reads self.wo.weight.dtype
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(not torch.equal(layer.values, before[name]) for name, layer in sparse_layers(model))


def test_resize_token_embeddings_with_a_sparse_lm_head_needs_the_head_dense_first():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = sparsify(LlamaForCausalLM(config), filter_fn=lambda module, fqn: fqn == "lm_head", block_size=16)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    with pytest.raises(TypeError, match="not an instance of"):  # transformers' own check reads .weight, then the type
        copy.deepcopy(model).resize_token_embeddings(144)
    model.lm_head = model.lm_head.to_linear()  # the documented recipe: dense head, resize, sparsify it again
    model.resize_token_embeddings(144, mean_resizing=False)
    sparsify(model, filter_fn=lambda module, fqn: fqn == "lm_head", block_size=16, density=1.0)
    after = model(ids).logits
    assert isinstance(model.lm_head, BlockSparseLinear) and after.shape[-1] == 144
    assert torch.allclose(after[..., :128], before, atol=1e-5)


def test_every_view_agrees_with_the_output_when_a_row_repeats_a_column():
    layer = BlockSparseLinear(64, 32, block_size=16, density=0.5)
    with torch.no_grad():
        layer.col_indices[0] = torch.tensor([1, 1], dtype=torch.int32)  # bypasses the checks on purpose
    x = torch.randn(4, 64)
    out = layer(x)
    assert torch.allclose(out, x @ layer.to_dense().T + layer.bias, atol=1e-5)
    assert torch.allclose(out, x @ layer.weight.T + layer.bias, atol=1e-5)
    assert torch.allclose(out, layer.to_linear()(x), atol=1e-5)
