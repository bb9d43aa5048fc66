"""TopologyOptimizer.consolidate(): the end of a task keeps its most important blocks in place (at a scaled
learning rate, optimizer state intact) and releases its least important ones to the next task."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify import TopologyConfig, TopologyOptimizer
from sparsify.topology.scores import block_magnitudes
from tests.test_topology_optimizer import batch, tiny_llama, train

CHURN = dict(score_every=1, update_every=2, prune_fraction=1.0, swap_threshold=0.0, epsilon=0.5)


def build(inner=torch.optim.AdamW, **config):
    model = tiny_llama(1)
    opt = TopologyOptimizer(inner(model.parameters(), lr=1e-2), model, TopologyConfig(**config))
    return model, opt


def test_importance_is_block_weight_norm_times_block_gradient_ema_and_the_top_fraction_is_kept():
    model, opt = build(**CHURN, consolidate_keep=0.25, consolidate_release=0.25)
    train(model, opt, range(3))
    expected = {n: block_magnitudes(m.values) * opt.layer_scores[n].block_ema for n, m in opt.layers.items()}
    importance = opt.consolidate()
    for name, s in opt.layer_scores.items():
        torch.testing.assert_close(importance[name], expected[name], rtol=1e-12, atol=0)
        n, flat = importance[name].numel(), importance[name].flatten()
        kept, released = s.kept.flatten(), s.released.flatten()
        assert int(kept.sum()) == round(0.25 * n) and int(released.sum()) == round(0.25 * n)
        assert float(flat[kept].min()) >= float(flat[~kept].max())
        assert float(flat[released].max()) <= float(flat[~released].min())
        assert not bool((kept & released).any())
        assert float(s.block_ema.abs().sum()) == 0 and float(s.probe_ema.abs().sum()) == 0  # statistics restart


def test_kept_blocks_never_move_through_a_task_of_maximum_churn_and_keep_their_optimizer_state():
    model, opt = build(**CHURN, consolidate_keep=0.5, consolidate_lr_scale=1.0)
    train(model, opt, range(4))
    opt.consolidate()
    kept = {n: s.kept.clone() for n, s in opt.layer_scores.items()}
    cols = {n: m.col_indices[kept[n]].clone() for n, m in opt.layers.items()}
    swaps_before = sum(d.num_swaps for d in opt.history)
    for step in range(4, 14):
        before = {n: opt.state[m.values]["exp_avg"].clone() for n, m in opt.layers.items()}
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        grads = {n: m.values.grad.clone() for n, m in opt.layers.items()}
        opt.step()
        opt.zero_grad()
        for name, layer in opt.layers.items():
            assert torch.equal(layer.col_indices[kept[name]], cols[name]), (step, name)
            # Adam's moments of kept slots follow Adam alone: never reset by a decision
            expected = 0.9 * before[name][kept[name]] + 0.1 * grads[name][kept[name]]
            torch.testing.assert_close(opt.state[layer.values]["exp_avg"][kept[name]], expected, rtol=1e-5, atol=1e-9)
    assert sum(d.num_swaps for d in opt.history) > swaps_before  # the other blocks did move


def test_kept_blocks_train_at_the_scaled_learning_rate():
    model, opt = build(torch.optim.SGD, update_every=1000, consolidate_keep=0.5, consolidate_lr_scale=0.25)
    train(model, opt, range(2))
    opt.consolidate()
    ids = batch(2)
    model(input_ids=ids, labels=ids).loss.backward()
    before = {n: m.values.detach().clone() for n, m in opt.layers.items()}
    grads = {n: m.values.grad.clone() for n, m in opt.layers.items()}
    opt.step()
    for name, layer in opt.layers.items():
        kept = opt.layer_scores[name].kept
        change = layer.values.detach() - before[name]
        torch.testing.assert_close(change[kept], -0.25 * 1e-2 * grads[name][kept], rtol=1e-4, atol=2e-8)  # float32 values: changes carry ~1e-8 rounding
        torch.testing.assert_close(change[~kept], -1e-2 * grads[name][~kept], rtol=1e-4, atol=2e-8)  # float32 values: changes carry ~1e-8 rounding


def test_released_blocks_are_swapped_at_the_next_decision():
    model, opt = build(score_every=1, update_every=3, prune_fraction=1.0, swap_threshold=1.5, epsilon=0.0,
                       consolidate_keep=0.0, consolidate_release=0.25)
    train(model, opt, range(3))
    opt.consolidate()
    released = {n: s.released.clone() for n, s in opt.layer_scores.items()}
    cols = {n: m.col_indices.clone() for n, m in opt.layers.items()}
    train(model, opt, range(3, 6))  # the decision at step 6
    for name, layer in opt.layers.items():
        assert bool(released[name].any())
        moved = layer.col_indices != cols[name]
        assert bool(moved[released[name]].all()), name  # every released slot went to a new column
        assert not bool(opt.layer_scores[name].released.any())  # and is no longer released


def test_consolidation_survives_a_checkpoint_and_older_checkpoints_load_without_it():
    model, opt = build(**CHURN)
    train(model, opt, range(3))
    opt.consolidate()
    state = copy.deepcopy(opt.state_dict())
    model_b, opt_b = build(**CHURN)
    model_b.load_state_dict(model.state_dict())
    opt_b.load_state_dict(state)
    for name, s in opt_b.layer_scores.items():
        assert torch.equal(s.kept, opt.layer_scores[name].kept) and s.any_kept
        assert torch.equal(s.released, opt.layer_scores[name].released)
    for layer_state in state["topology"]["layers"].values():
        del layer_state["kept"], layer_state["released"]
    opt_b.load_state_dict(state)
    assert not any(s.any_kept or bool(s.kept.any()) for s in opt_b.layer_scores.values())


@pytest.mark.parametrize("field, value", [("consolidate_keep", 1.5), ("consolidate_lr_scale", -0.1),
                                          ("consolidate_release", "0.1")])
def test_consolidate_knobs_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        TopologyConfig(**{field: value})
    with pytest.raises(ValueError, match="cannot be both kept and released"):
        TopologyConfig(consolidate_keep=0.6, consolidate_release=0.5)
