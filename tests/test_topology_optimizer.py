"""TopologyOptimizer on a tiny HF Llama: in-place decisions, state resets, determinism, checkpoints."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from sparsify import BlockSparseLinear, TopologyConfig, TopologyOptimizer, sparsify
from sparsify.block_ell import check_col_indices

VOCAB = 128


def tiny_llama(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
    )
    return sparsify(LlamaForCausalLM(config), components="mlp", density=0.5, block_size=16)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(step))


def train(model, opt, steps: range, on_step=None) -> None:
    for step in steps:
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if on_step is not None:
            on_step(step)
        opt.zero_grad()


# lively settings so a few steps show several decisions with swaps
LIVELY = dict(score_every=2, update_every=3, prune_fraction=0.5, swap_threshold=1.0, epsilon=0.2)


def make(config: TopologyConfig, inner=torch.optim.AdamW, **kw):
    model = tiny_llama()
    opt = TopologyOptimizer(inner(model.parameters(), lr=1e-3, **kw), model, config)
    return model, opt


def test_topology_is_valid_and_updated_in_place_after_every_step():
    model, opt = make(TopologyConfig(**LIVELY))
    layers = list(opt.layers.values())
    pointers = [(m.values.data_ptr(), m.col_indices.data_ptr(), m.values, m.col_indices) for m in layers]
    shapes = [tuple(m.col_indices.shape) for m in layers]

    def check(step):
        for m, (vp, cp, values, cols), shape in zip(layers, pointers, shapes):
            check_col_indices(m.col_indices, m.num_cols, "test")
            assert m.values is values and m.col_indices is cols
            assert m.values.data_ptr() == vp and m.col_indices.data_ptr() == cp
            assert tuple(m.col_indices.shape) == shape and m.col_indices.dtype == torch.int32

    train(model, opt, range(12), check)
    assert sum(d.num_swaps for d in opt.history) > 0
    assert {d.step for d in opt.history} == {3, 6, 9, 12}


def _first_decision_with_swaps(model, opt, on_state=None):
    """Train until a step whose decision swapped blocks; return that step's records."""
    for step in range(30):
        before = {n: m.col_indices.clone() for n, m in opt.layers.items()}
        state_before = copy.deepcopy({n: opt.state[m.values] for n, m in opt.layers.items() if m.values in opt.state})
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        records = [d for d in opt.history if d.step == opt.global_step and d.num_swaps]
        if records:
            return records, before, state_before
        opt.zero_grad()
    pytest.fail("no decision swapped a block in 30 steps")


def test_grown_blocks_start_at_zero_and_their_adam_state_is_reset_when_grow_init_is_zeros():
    model, opt = make(TopologyConfig(grow_init="zeros", **LIVELY))
    records, before, _ = _first_decision_with_swaps(model, opt)
    for record in records:
        layer, scores = opt.layers[record.layer], opt.layer_scores[record.layer]
        state = opt.state[layer.values]
        grown = set((r, s) for r, s, _ in record.grown)
        for row, slot, column in record.grown:
            assert int(layer.col_indices[row, slot]) == column != int(before[record.layer][row, slot])
            assert torch.count_nonzero(layer.values[row, slot]) == 0
            assert torch.count_nonzero(state["exp_avg"][row, slot]) == 0
            assert torch.count_nonzero(state["exp_avg_sq"][row, slot]) == 0
            assert int(scores.age[row, slot]) == 0
        kept = [(r, s) for r in range(layer.num_rows) for s in range(layer.blocks_per_row) if (r, s) not in grown]
        # kept slots keep their state (a slot whose rows feed nothing downstream has zero gradient and state)
        trained = [(r, s) for r, s in kept if torch.count_nonzero(layer.values.grad[r, s]) > 0]
        assert trained and all(torch.count_nonzero(state["exp_avg_sq"][r, s]) > 0 for r, s in trained)
        assert all(int(scores.age[r, s]) == opt.global_step for r, s in kept)


def test_grown_blocks_are_kaiming_uniform_scaled_by_a_tenth_when_grow_init_is_kaiming():
    model, opt = make(TopologyConfig(grow_init="kaiming", **LIVELY))
    records, _, _ = _first_decision_with_swaps(model, opt)
    for record in records:
        layer = opt.layers[record.layer]
        bound = 0.1 / math.sqrt(layer.in_features)
        for row, slot, _ in record.grown:
            block = layer.values.detach()[row, slot]
            assert float(block.abs().max()) <= bound and float(block.abs().max()) > bound / 2
            assert float(block.std()) == pytest.approx(bound / math.sqrt(3), rel=0.3)


def test_sgd_momentum_of_swapped_slots_is_reset():
    model, opt = make(TopologyConfig(**LIVELY), inner=torch.optim.SGD, momentum=0.9)
    records, _, _ = _first_decision_with_swaps(model, opt)
    for record in records:
        buffer = opt.state[opt.layers[record.layer].values]["momentum_buffer"]
        assert all(torch.count_nonzero(buffer[r, s]) == 0 for r, s, _ in record.grown)
        assert torch.count_nonzero(buffer) > 0


def test_two_runs_with_one_seed_give_identical_topologies_and_another_seed_differs():
    runs = []
    for seed in (3, 3, 4):
        model, opt = make(TopologyConfig(seed=seed, **LIVELY))
        train(model, opt, range(9))
        runs.append(([m.col_indices.clone() for m in opt.layers.values()], [m.values.detach().clone() for m in opt.layers.values()]))
    (a_cols, a_vals), (b_cols, b_vals), (c_cols, _) = runs
    assert all(torch.equal(x, y) for x, y in zip(a_cols, b_cols))
    assert all(torch.equal(x, y) for x, y in zip(a_vals, b_vals))
    assert not all(torch.equal(x, y) for x, y in zip(a_cols, c_cols))


def test_a_checkpoint_between_decisions_resumes_bit_identically(tmp_path):
    config = TopologyConfig(**LIVELY)
    straight_model, straight_opt = make(config)
    train(straight_model, straight_opt, range(25))

    first_model, first_opt = make(config)
    train(first_model, first_opt, range(12))
    torch.save({"model": first_model.state_dict(), "optimizer": first_opt.state_dict()}, tmp_path / "ckpt.pt")
    del first_model, first_opt

    resumed_model = tiny_llama()
    with torch.no_grad():  # start from different weights and topology: everything must come from the checkpoint
        for m in resumed_model.modules():
            if isinstance(m, BlockSparseLinear):
                m.values.mul_(-1)
                m.col_indices.copy_(m.col_indices.flip(1))
    resumed_opt = TopologyOptimizer(torch.optim.AdamW(resumed_model.parameters(), lr=1e-3), resumed_model, config)
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed_model.load_state_dict(checkpoint["model"])
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    assert resumed_opt.global_step == 12 and len(resumed_opt.history) == len([d for d in straight_opt.history if d.step <= 12])
    train(resumed_model, resumed_opt, range(12, 25))

    assert sum(d.num_swaps for d in straight_opt.history if d.step > 12) > 0
    for (name, a), b in zip(straight_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name
    for name, s in straight_opt.layer_scores.items():
        for field in ("block_ema", "probe_ema", "age", "ratio"):
            assert torch.equal(getattr(s, field), getattr(resumed_opt.layer_scores[name], field)), (name, field)
    assert [d.to_dict() | {"seconds": 0} for d in straight_opt.history] == [d.to_dict() | {"seconds": 0} for d in resumed_opt.history]


def test_state_dict_keeps_the_wrapped_optimizers_keys_and_loads_with_weights_only(tmp_path):
    model, opt = make(TopologyConfig(**LIVELY))
    train(model, opt, range(4))
    sd = opt.state_dict()
    assert set(opt.optimizer.state_dict()) <= set(sd) and "topology" in sd
    torch.save(sd, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert loaded["topology"]["global_step"] == 4
    assert loaded["topology"]["history"][0]["pruned"] == [tuple(x) for x in sd["topology"]["history"][0]["pruned"]]


def test_lambda_lr_drives_the_wrapped_optimizers_learning_rate():
    model = tiny_llama(1)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = TopologyOptimizer(inner, model, TopologyConfig(update_every=2))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        train(model, opt, range(3), on_step=lambda _: scheduler.step())
    assert inner.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.5 ** 3)
    assert inner.param_groups[0]["initial_lr"] == 1e-3


def test_step_hooks_and_add_param_group_reach_the_wrapper_and_the_wrapped_optimizer():
    model = tiny_llama(1)
    inner = torch.optim.SGD([p for n, p in model.named_parameters() if "embed" not in n], lr=0.1)
    opt = TopologyOptimizer(inner, model, TopologyConfig(update_every=2))
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o))
    opt.add_param_group({"params": [model.model.embed_tokens.weight], "lr": 0.01})
    assert len(inner.param_groups) == 2
    train(model, opt, range(2))
    assert calls == [opt, opt] and opt.global_step == 2


def test_gradient_accumulation_sums_the_probe_over_micro_batches_before_the_ema():
    model, opt = make(TopologyConfig(candidate_ema=0.9))
    name, layer = next(iter(opt.layers.items()))
    for step in range(2):  # two micro-batches, one optimizer step
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
    energy = layer.stats_probe.grad.clone()
    opt.step()
    assert torch.allclose(opt.layer_scores[name].probe_ema, 0.1 * energy.sqrt())
    assert layer.stats_probe.grad is None


NAN_CONFIG = dict(score_every=1, update_every=2, prune_fraction=0.5, swap_threshold=0.0, epsilon=1.0)


def test_nonfinite_gradient_skips_that_layers_decision_and_leaves_its_topology():
    model, opt = make(TopologyConfig(**NAN_CONFIG))
    name, layer = next(iter(opt.layers.items()))
    before = layer.col_indices.clone()
    train(model, opt, range(1))
    ids = batch(1)
    model(input_ids=ids, labels=ids).loss.backward()
    layer.values.grad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match=f"non-finite scores in {name} at step 2"):
        opt.step()
    assert torch.equal(layer.col_indices, before)
    records = {d.layer: d for d in opt.history}
    assert records[name].skipped == "nonfinite" and records[name].num_swaps == 0
    assert all(d.skipped is None and d.num_swaps > 0 for n, d in records.items() if n != name)
    assert bool(torch.isfinite(opt.layer_scores[name].block_ema).all())  # repaired for the next decision


def test_a_nonfinite_gradient_leaves_its_score_entries_as_they_were_until_the_decision():
    model, opt = make(TopologyConfig(update_every=100))
    name, layer = next(iter(opt.layers.items()))
    scores = opt.layer_scores[name]
    train(model, opt, range(1))
    before = scores.block_ema.clone()
    assert not bool(scores.nonfinite())
    ids = batch(1)
    model(input_ids=ids, labels=ids).loss.backward()
    layer.values.grad[0, 0, 0, 0] = float("inf")
    opt.step()  # no warning yet: the flag is read at the next decision, not now (that would stall a GPU)
    assert scores.block_ema[0, 0] == before[0, 0] and bool(torch.isfinite(scores.block_ema).all())
    assert not torch.equal(scores.block_ema[1:], before[1:])  # every other block moved
    assert bool(scores.nonfinite()) and opt.state_dict()["topology"]["layers"][name]["nonfinite"]


def test_nonfinite_statistics_are_warned_once_and_later_decisions_recover():
    model, opt = make(TopologyConfig(**NAN_CONFIG))
    name, layer = next(iter(opt.layers.items()))
    before = layer.col_indices.clone()
    with pytest.warns(RuntimeWarning, match="non-finite"):
        for step in range(2):
            ids = batch(step)
            model(input_ids=ids, labels=ids).loss.backward()
            layer.stats_probe.grad[-1] = float("inf")  # e.g. squared activations overflowing
            opt.step()
            opt.zero_grad()
    assert torch.equal(layer.col_indices, before)
    assert next(d for d in opt.history if d.layer == name).skipped == "nonfinite"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        train(model, opt, range(2, 4))
    assert any(d.num_swaps for d in opt.history if d.layer == name and d.step == 4)


def test_protected_slots_are_neither_pruned_nor_updated():
    model, opt = make(TopologyConfig(score_every=1, update_every=2, prune_fraction=1.0, swap_threshold=0.0, epsilon=0.5),
                      weight_decay=0.1)
    name, layer = next(iter(opt.layers.items()))
    mask = torch.zeros(layer.num_rows, layer.blocks_per_row, dtype=torch.bool)
    mask[:, 0] = True
    opt.protect(name, mask)
    cols, values = layer.col_indices[mask].clone(), layer.values.detach()[mask].clone()
    train(model, opt, range(6))
    assert torch.equal(layer.col_indices[mask], cols) and torch.equal(layer.values.detach()[mask], values)
    assert not torch.equal(layer.values.detach()[~mask], values[: int((~mask).sum())])  # the others do train
    assert any(d.num_swaps for d in opt.history if d.layer == name)
    assert opt.state_dict()["topology"]["layers"][name]["protected"].equal(mask)
    opt.protect(layer, None)
    assert not opt.layer_scores[name].has_protected()
    with pytest.raises(ValueError, match=r"bool mask of shape"):
        opt.protect(name, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(KeyError):
        opt.protect("model.layers.9.mlp.up_proj", mask)


def test_magnitude_scorer_prunes_by_block_weight_norm():
    model, opt = make(TopologyConfig(scorer="magnitude", **LIVELY))
    norms = {}
    # the wrapped optimizer's post hook sees the weights the decision will read
    opt.optimizer.register_step_post_hook(lambda *_: norms.update(
        {n: m.values.detach().float().flatten(2).norm(dim=2) for n, m in opt.layers.items()}))
    train(model, opt, range(3))
    records = [d for d in opt.history if d.num_swaps]
    assert records
    for record in records:
        expected = [float(norms[record.layer][r, s]) for r, s, _ in record.pruned]
        assert record.pruned_scores == pytest.approx(expected)
    assert all(float(s.block_ema.abs().sum()) == 0 for s in opt.layer_scores.values())  # no gradient EMA kept


@pytest.mark.parametrize("field, value, match", [
    ("update_every", 0, "positive number of steps"),
    ("score_every", 2.5, "positive number of steps"),
    ("prune_fraction", 1.5, r"in \[0, 1\]"),
    ("epsilon", -0.1, r"in \[0, 1\]"),
    ("score_ema", 1.0, "below 1"),
    ("swap_threshold", float("nan"), "finite number"),
    ("grow_init", "normal", "grow_init"),
    ("scorer", "wanda", "scorer"),
    ("seed", "0", "seed"),
])
def test_config_rejects_bad_values_with_a_hint(field, value, match):
    with pytest.raises(ValueError, match=match):
        TopologyConfig(**{field: value})


def test_constructor_rejects_models_without_trained_sparse_layers():
    dense = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match="no BlockSparseLinear"):
        TopologyOptimizer(torch.optim.SGD(dense.parameters(), lr=0.1), dense)
    model = tiny_llama(1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        TopologyOptimizer("adam", model)


def test_probe_is_reregistered_as_a_float64_leaf_when_the_model_was_cast():
    model = tiny_llama(1).to(torch.bfloat16)
    opt = TopologyOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), model, TopologyConfig(update_every=1))
    layer = next(iter(opt.layers.values()))
    assert layer.stats_probe.dtype == torch.float64 and layer.stats_probe.requires_grad
    assert "stats_probe" not in layer.state_dict()
    train(model, opt, range(2))
    assert bool(torch.isfinite(opt.layer_scores[next(iter(opt.layers))].probe_ema).all())


def test_step_with_a_closure_returns_its_loss_and_scores_its_gradients():
    model = tiny_llama(1)
    opt = TopologyOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, TopologyConfig(update_every=5))
    name = next(iter(opt.layers))

    def closure():
        opt.zero_grad()
        ids = batch(0)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss) and opt.global_step == 1
    assert float(opt.layer_scores[name].block_ema.sum()) > 0 and float(opt.layer_scores[name].probe_ema.sum()) > 0


def test_zero_grad_also_clears_the_stats_probes():
    model, opt = make(TopologyConfig())
    ids = batch(0)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.stats_probe.grad is not None for m in opt.layers.values())
    opt.zero_grad()
    assert all(m.stats_probe.grad is None and m.values.grad is None for m in opt.layers.values())
