"""Selection on HF families beyond the decoder-only four: T5 / flan-T5 MLPs, choosing an
encoder-decoder stack, tied word embeddings, mixture-of-experts (tiny models from configs)."""

import contextlib
import warnings

import pytest
import torch

from sparsify import BlockSparseLinear, sparse_layers, sparsify, sparsity_table
from sparsify.api import skipped_layers
from tests.conftest import VOCAB, tiny_gpt2
from tests.test_errors import assert_refused


def tiny_t5(gated: bool = False, layers: int = 2):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=layers, num_decoder_layers=layers, num_heads=4,
                      d_kv=16, feed_forward_proj="gated-gelu" if gated else "relu", decoder_start_token_id=0,
                      use_cache=False)
    return T5ForConditionalGeneration(config)


def tiny_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    config = BartConfig(vocab_size=VOCAB, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128, encoder_layers=2,
                        decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                        max_position_embeddings=64, use_cache=False)
    return BartForConditionalGeneration(config).eval()


def tiny_llama_tied():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config).eval()


def tiny_mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           use_cache=False)
    return MixtralForCausalLM(config).eval()


def names(model):
    return {name for name, _ in sparse_layers(model)}


def test_t5_mlp_selects_dense_relu_dense_wi_and_wo_in_both_stacks():
    model = sparsify(tiny_t5(), components="mlp")
    assert names(model) == {f"{stack}.block.{i}.layer.{j}.DenseReluDense.{leaf}"
                            for stack, j in (("encoder", 1), ("decoder", 2)) for i in (0, 1) for leaf in ("wi", "wo")}


def test_flan_t5_mlp_selects_the_gated_wi_0_wi_1_and_wo():
    model = sparsify(tiny_t5(gated=True), layers="encoder.0", components="mlp")
    assert names(model) == {f"encoder.block.0.layer.1.DenseReluDense.{leaf}" for leaf in ("wi_0", "wi_1", "wo")}


@pytest.mark.skipif(not hasattr(BlockSparseLinear, "weight"), reason="T5 reads wo.weight.dtype: needs BlockSparseLinear.weight")
def test_t5_with_sparse_mlps_trains():
    model = sparsify(tiny_t5(), components="mlp", density=0.5).train()
    ids = torch.randint(1, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(layer.values.grad is not None and layer.values.grad.abs().sum() > 0 for _, layer in sparse_layers(model))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("decoder.1", {"decoder.block.1"}),
        ("encoder.0..1", {"encoder.block.0", "encoder.block.1"}),
        ("encoder.0,decoder.1", {"encoder.block.0", "decoder.block.1"}),
        ("encoder.block.1", {"encoder.block.1"}),
        (1, {"encoder.block.1", "decoder.block.1"}),  # an index alone: that layer of every stack
    ],
)
def test_a_stack_name_in_the_layer_spec_chooses_encoder_or_decoder(spec, expected):
    model = sparsify(tiny_t5(), layers=spec, components="mlp")
    assert {".".join(name.split(".")[:3]) for name in names(model)} == expected


def test_bart_decoder_layers_are_chosen_by_stack_name():
    model = sparsify(tiny_bart(), layers="decoder.1..2", components="mlp")
    assert names(model) == {f"model.decoder.layers.{i}.{leaf}" for i in (1, 2) for leaf in ("fc1", "fc2")}


def test_an_unknown_stack_or_a_missing_index_of_one_stack_is_refused_naming_the_stacks():
    model = tiny_bart()
    assert_refused(model, r"no layer stack is named 'middle'; the model's stacks are "
                          r"\['model\.decoder\.layers', 'model\.encoder\.layers'\]", layers="middle.1")
    assert_refused(model, r"layers \[2\] of encoder do not exist; the model has layers 0\.\.2 "
                          r"\(stacks model\.decoder\.layers 0\.\.2, model\.encoder\.layers 0\.\.1", layers="encoder.1..2")


def test_a_tied_lm_head_is_skipped_reported_and_stays_tied():
    model = tiny_llama_tied()
    with pytest.warns(UserWarning, match=r"left dense: lm_head: its weight is tied to model\.embed_tokens\.weight"):
        sparsify(model, density=0.5)
    assert "lm_head" not in names(model) and "model.layers.1.mlp.up_proj" in names(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.config.tie_word_embeddings
    assert [s.fqn for s in skipped_layers(model)] == ["lm_head"]
    assert "left dense: lm_head: its weight is tied to model.embed_tokens.weight" in sparsity_table(model)


def test_gpt2_lm_head_tied_by_default_is_left_dense():
    model = tiny_gpt2()
    with pytest.warns(UserWarning, match=r"lm_head: its weight is tied to transformer\.wte\.weight"):
        sparsify(model)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert len(names(model)) == 4 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 4 layers


def test_asking_for_a_tied_lm_head_alone_is_refused_with_how_to_untie():
    assert_refused(tiny_llama_tied(), r"every selected linear must stay dense: lm_head: its weight is tied.*untie it first",
                   components="lm_head")


def test_mixtral_mlp_names_the_experts_as_unsupported():
    assert_refused(tiny_mixtral(), r"components='mlp' matched no linear: this model's MLPs are mixture-of-experts "
                                   r"weights .*model\.layers\.0\.mlp\.experts \(MixtralExperts\).*does not support them",
                   components="mlp")


def test_mixtral_with_no_selector_rewrites_the_linears_and_reports_the_experts_left_dense():
    model = tiny_mixtral()
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts: mixture-of-experts weights \(MixtralExperts\)"):
        sparsify(model, layers="0..1")
    assert names(model) == {f"model.layers.{i}.self_attn.{p}_proj" for i in (0, 1) for p in "qkvo"}
    assert {s.fqn for s in skipped_layers(model)} == {"model.layers.0.mlp.experts", "model.layers.1.mlp.experts"}
    assert "left dense: model.layers.1.mlp.experts" in sparsity_table(model)


def test_qwen2_moe_mlp_rewrites_the_shared_expert_not_its_gate_and_reports_the_experts():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            shared_expert_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, use_cache=False)
    model = Qwen2MoeForCausalLM(config)
    with pytest.warns(UserWarning, match=r"model\.layers\.0\.mlp\.experts: mixture-of-experts weights"):
        sparsify(model, components="mlp")
    assert names(model) == {f"model.layers.{i}.mlp.shared_expert.{p}_proj" for i in (0, 1) for p in ("gate", "up", "down")}


def test_selecting_only_attention_says_nothing_about_experts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = sparsify(tiny_mixtral(), components="attn")
    assert not skipped_layers(model)


def test_falcon_mlp_selects_dense_h_to_4h_and_dense_4h_to_h():
    from transformers import FalconConfig, FalconForCausalLM

    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_cache=False)
    model = sparsify(FalconForCausalLM(config), components="mlp")
    assert {name.rsplit(".", 1)[-1] for name in names(model)} == {"dense_h_to_4h", "dense_4h_to_h"}
    assert len(names(model)) == 4


class _AnyMode(torch.overrides.TorchFunctionMode):
    """A no-op torch-function mode: under it the layer takes the registered op instead of the eager route."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("route", ["eager", "op"])
def test_falcon_trains_through_its_in_place_residual_on_sparse_mlps(route):
    from transformers import FalconConfig, FalconForCausalLM

    torch.manual_seed(0)
    config = FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, use_cache=False,
                          new_decoder_architecture=False, parallel_attn=True)
    model = sparsify(FalconForCausalLM(config), components="mlp", block_size=16).train()
    tokens = torch.randint(0, VOCAB, (2, 12))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    with _AnyMode() if route == "op" else contextlib.nullcontext():
        for _ in range(3):  # Falcon adds the attention output into the MLP's output in place
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            assert all(layer.values.grad.abs().sum() > 0 for _, layer in sparse_layers(model))
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
