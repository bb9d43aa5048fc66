"""LoRA adapters from the real peft package on top of sparse layers."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from sparsify import BlockSparseLinear, sparse_layers, sparsify  # noqa: E402
from sparsify.integrations.lora import BlockSparseLoraLinear, with_block_sparse  # noqa: E402
from tests.conftest import tiny_llama  # noqa: E402


def sparse_llama():
    return sparsify(tiny_llama(layers=2), components="up_proj", block_size=16, density=0.5)


def test_lora_on_a_sparse_layer_trains_the_adapter_and_leaves_the_sparse_layer_frozen(token_ids):
    model = get_peft_model(sparse_llama(), with_block_sparse(LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj"])))
    wrapped = [m for m in model.modules() if isinstance(m, BlockSparseLoraLinear)]
    assert len(wrapped) == 2 and all(isinstance(m.base_layer, BlockSparseLinear) for m in wrapped)
    frozen = {name: layer.values.detach().clone() for name, layer in sparse_layers(model)}
    with torch.no_grad():  # lora_B starts at zero: the adapter adds nothing until trained
        base_out = model(token_ids).logits
        with model.disable_adapter():
            assert torch.equal(model(token_ids).logits, base_out)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(input_ids=token_ids, labels=token_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert all(torch.equal(layer.values, frozen[name]) for name, layer in sparse_layers(model))
    assert not torch.equal(model(token_ids).logits, base_out)  # the adapter now contributes


def test_merging_a_lora_adapter_into_a_sparse_layer_is_refused_with_the_fix():
    model = get_peft_model(sparse_llama(), with_block_sparse(LoraConfig(r=4, target_modules=["up_proj"])))
    with pytest.raises(ValueError, match="cannot be merged into a block-sparse layer.*densify"):
        model.merge_and_unload()


def test_lora_without_the_registration_names_the_unsupported_sparse_layer():
    with pytest.raises(ValueError, match="BlockSparseLinear"):
        get_peft_model(sparse_llama(), LoraConfig(r=4, target_modules=["up_proj"]))


def test_all_linear_skips_the_sparse_layers():
    model = get_peft_model(sparse_llama(), with_block_sparse(LoraConfig(r=4, target_modules="all-linear")))
    assert not any(isinstance(m, BlockSparseLoraLinear) for m in model.modules())
    assert all(type(layer) is BlockSparseLinear for _, layer in sparse_layers(model))
    assert any("q_proj.lora_A" in name for name, _ in model.named_parameters())  # the dense linears got adapters
