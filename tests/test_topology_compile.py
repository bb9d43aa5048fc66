"""A compiled model trains through several topology updates without recompiling."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import TopologyConfig, TopologyOptimizer, sparsify


@pytest.fixture
def no_recompiles():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


def test_compiled_model_trains_through_topology_updates_without_recompiling(no_recompiles):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    model = sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)
    topology = TopologyConfig(score_every=1, update_every=1, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.5)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, topology)  # before compiling
    compiled = torch.compile(model)
    layer = next(iter(opt.layers.values()))
    first = layer.col_indices.clone()
    data = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 16), generator=data)
        loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    updates_with_swaps = {d.step for d in opt.history if d.num_swaps}
    assert len(updates_with_swaps) >= 3
    assert not torch.equal(layer.col_indices, first)
    assert all(torch.isfinite(torch.tensor(losses)))
    # the compiled model computes with the current topology: same output as the eager model
    ids = torch.randint(0, 128, (2, 16), generator=data)
    compiled_logits = compiled(input_ids=ids, labels=ids).logits  # the call pattern that was compiled
    assert torch.allclose(compiled_logits, model(input_ids=ids, labels=ids).logits, atol=1e-5)
