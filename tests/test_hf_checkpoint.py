"""A sparsified HF model saves and loads like any HF model: save_pretrained / from_pretrained
(safetensors) give back a sparse model with the same topology and identical logits."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import sparsify.integrations.hf_checkpoint  # noqa: F401  (registers quant_method "sparsify" with transformers)
from sparsify import BlockSparseLinear, TopologyConfig, TopologyOptimizer, block_ell, densify, sparse_layers, sparsify
from sparsify.integrations.hf_checkpoint import record_sparsity
from tests.conftest import tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def sparse_model(kind: str, **overrides):
    model = sparsify(MODELS[kind](), **{"components": "mlp", "layers": "1..2", "density": 0.5, "block_size": 16, **overrides})
    record_sparsity(model)  # what sparsify() does for HF models; repeating it is harmless
    return model


def topologies(model) -> dict[str, torch.Tensor]:
    return {name: layer.col_indices.clone() for name, layer in sparse_layers(model)}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_save_pretrained_then_from_pretrained_gives_the_same_sparse_model(kind, tmp_path, token_ids):
    model = sparse_model(kind)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert stored["quant_method"] == "sparsify"
    assert stored["modules"] == {name: layer.config.to_dict() for name, layer in sparse_layers(model)}

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [name for name, _ in sparse_layers(loaded)] == [name for name, _ in sparse_layers(model)]
    assert all(torch.equal(a, b) for a, b in zip(topologies(loaded).values(), topologies(model).values()))
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)
    assert not loaded.is_quantized and loaded.hf_quantizer is None  # an ordinary model: .half(), Trainer, densify
    corrupt = {k: v.clone() for k, v in loaded.state_dict().items()}
    corrupt[next(k for k in corrupt if k.endswith("col_indices"))].fill_(-1)
    with pytest.raises(ValueError, match="col_indices hold values"):
        loaded.load_state_dict(corrupt)  # guarded like a sparsified model: nothing copied
    loaded.half()


def test_an_evolved_topology_survives_save_and_load(tmp_path, token_ids):
    model = sparse_model("llama").train()
    initial = topologies(model)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model,
                            TopologyConfig(score_every=1, update_every=2, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.3))
    for _ in range(4):
        model(input_ids=token_ids, labels=token_ids).loss.backward()
        opt.step()
        opt.zero_grad()
    evolved = topologies(model)
    assert any(not torch.equal(evolved[name], initial[name]) for name in evolved)
    model.eval().save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(topologies(loaded)[name], evolved[name]) for name in evolved)
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_densified_model_saves_a_stock_checkpoint(kind, tmp_path, token_ids):
    sparse = sparse_model(kind)
    expected = sparse(token_ids).logits
    model = densify(sparse)  # GPT-2's sparse MLPs become Conv1D again, the layout stock transformers loads
    model.save_pretrained(tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    assert not any(key.endswith("col_indices") for key in load_file(tmp_path / "model.safetensors"))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not sparse_layers(loaded)
    assert [type(m) for m in loaded.modules()] == [type(m) for m in MODELS[kind]().modules()]
    assert torch.allclose(loaded(token_ids).logits, expected, atol=1e-5)


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_from_pretrained_dtype_casts_values_and_keeps_the_topology_integer(keyword, dtype, tmp_path):
    model = sparse_model("llama")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, **{keyword: dtype})
    for name, layer in sparse_layers(loaded):
        assert layer.values.dtype == dtype and layer.col_indices.dtype == torch.int32
        assert layer.stats_probe.dtype == torch.float32
        assert torch.equal(layer.col_indices, model.get_submodule(name).col_indices)
    assert loaded.model.embed_tokens.weight.dtype == dtype


def test_loading_with_ignore_mismatched_sizes_keeps_the_sparse_layers(tmp_path, token_ids):
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, pad_token_id=0, num_labels=2)
    model = sparsify(LlamaForSequenceClassification(config), components="mlp", block_size=16)
    record_sparsity(model)
    model.save_pretrained(tmp_path)
    other_head = AutoConfig.from_pretrained(tmp_path, num_labels=5)
    if Version(transformers.__version__) < Version("5.24"):  # may load the [2, 64] head unchecked: refused instead
        with pytest.raises(ValueError, match=r"score\.weight \(2, 64\) \(expected \(5, 64\)\)"):
            AutoModelForSequenceClassification.from_pretrained(tmp_path, config=other_head, ignore_mismatched_sizes=True)
        return
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, config=other_head, ignore_mismatched_sizes=True)
    assert loaded.score.weight.shape == (5, 64)
    for name, layer in sparse_layers(model):
        other = loaded.get_submodule(name)
        assert isinstance(other, BlockSparseLinear)
        assert torch.equal(other.col_indices, layer.col_indices) and torch.equal(other.values, layer.values)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_from_pretrained_without_a_checkpoint_takes_the_given_state_dict(kind, token_ids):
    model = sparse_model(kind)
    loaded = type(model).from_pretrained(None, config=model.config, state_dict=model.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_from_pretrained_with_an_empty_state_dict_initializes_every_buffer(kind, token_ids):
    model = sparse_model(kind)
    fresh = type(model).from_pretrained(None, config=model.config, state_dict={})
    assert len(sparse_layers(fresh)) == len(sparse_layers(model))
    for name, layer in sparse_layers(fresh):
        block_ell.check_col_indices(layer.col_indices, layer.num_cols, name)
        assert torch.equal(layer.stats_probe, torch.zeros_like(layer.stats_probe))
        assert 0 < layer.values.abs().max() <= 1 / layer.in_features ** 0.5
    assert torch.isfinite(fresh(token_ids).logits).all()


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_a_model_built_on_meta_sparsifies_and_initializes_through_its_own_init(kind, token_ids):
    with torch.device("meta"):
        model = MODELS[kind]()
    sparsify(model, components="mlp", block_size=16, density=0.5)
    assert all(layer.col_indices.is_meta for _, layer in sparse_layers(model))
    model.to_empty(device="cpu")
    model.init_weights()  # GPT-2's init reads module.c_proj.weight of the sparse MLP
    for name, layer in sparse_layers(model):
        block_ell.check_col_indices(layer.col_indices, layer.num_cols, name)
        assert torch.equal(layer.stats_probe, torch.zeros_like(layer.stats_probe))
        assert 0 < layer.values.abs().max() <= 1 / layer.in_features ** 0.5
    assert torch.isfinite(model(token_ids).logits).all()


def test_a_corrupt_topology_in_the_checkpoint_is_refused_by_name(tmp_path):
    model = sparse_model("llama")
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["model.layers.2.mlp.down_proj.col_indices"][0, 0] = 99
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.down_proj: col_indices hold values"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_json_naming_a_module_the_model_lacks_is_refused(tmp_path):
    model = sparse_model("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["modules"]["model.layers.9.mlp.up_proj"] = {"density": 0.5, "block_size": 16}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"model\.layers\.9\.mlp\.up_proj: config\.json names this module"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_sparsify_and_densify_keep_the_hf_config_in_step():
    model = sparsify(tiny_llama(), components="mlp", layers="1", block_size=16)
    assert model.config.quantization_config["quant_method"] == "sparsify"
    assert sorted(model.config.quantization_config["modules"]) == sorted(name for name, _ in sparse_layers(model))
    densify(model)
    assert getattr(model.config, "quantization_config", None) is None


def test_a_model_quantized_by_transformers_is_refused_before_recording():
    from sparsify.integrations.hf_checkpoint import check_not_quantized

    model = tiny_llama(layers=1)
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(ValueError, match="quantized by transformers \\('bitsandbytes'\\)"):
        check_not_quantized(model)
    assert model.config.quantization_config["quant_method"] == "bitsandbytes"
    check_not_quantized(tiny_llama(layers=1))  # no quantization_config: fine


def test_a_model_sparsified_through_its_base_model_loads_as_the_task_model(tmp_path, token_ids):
    model = tiny_llama()
    sparsify(model.model, components="mlp", layers="1", block_size=16)  # names recorded without "model."
    record_sparsity(model.model)
    assert "layers.1.mlp.up_proj" in model.config.quantization_config["modules"]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [n for n, _ in sparse_layers(loaded)] == [n for n, _ in sparse_layers(model)]
    assert torch.equal(loaded(token_ids).logits, model(token_ids).logits)
