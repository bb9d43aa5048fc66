"""After TopologyOptimizer.consolidate(), decisions rank by specificity: a candidate column ranks by its
new-task score over its importance for the old task, an active block by its score times it, so growth
goes where the new task needs it and the old task did not; consolidate_rank="score" keeps the scores."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify import TopologyConfig, TopologyOptimizer
from sparsify.topology.consolidate import decide_by_specificity
from sparsify.topology.decide import decide_layers
from tests.test_topology_consolidate import CHURN, build
from tests.test_topology_optimizer import train

ONE_SWAP = TopologyConfig(prune_fraction=0.5, swap_threshold=0.0, epsilon=0.0)  # K = 2: one pair per row


def inputs(block, candidates):
    """One layer, one block-row, active columns 0 and 1 of four."""
    return dict(block_scores=torch.tensor([[block]], dtype=torch.float64),
                candidate_scores=torch.tensor([[candidates]], dtype=torch.float64),
                col_indices=torch.tensor([[[0, 1]]]), protected=torch.zeros(1, 1, 2, dtype=torch.bool),
                allowed=torch.ones(1, dtype=torch.bool))


def test_an_equally_scored_column_the_old_task_did_not_need_is_grown_before_one_it_did():
    x = inputs([1.0, 2.0], [0.0, 0.0, 5.0, 5.0])
    old = torch.tensor([[[0.5, 0.5, 3.0, 0.0]]], dtype=torch.float64)  # column 2 mattered to the old task
    by_score = decide_layers(config=ONE_SWAP, seed=7, **x)
    ranked = decide_by_specificity(x, old, ONE_SWAP, seed=7)
    assert by_score.grown_cols.tolist() == [[[2]]]  # a tie on score: the lower column
    assert ranked.grown_cols.tolist() == [[[3]]] and bool(ranked.swap.all())
    assert ranked.grown_scores.tolist() == [[[5.0]]] and ranked.pruned_scores.tolist() == [[[1.0]]]  # plain scores


def test_of_two_equally_weak_blocks_the_one_the_old_task_needed_less_is_pruned():
    x = inputs([1.0, 1.0], [0.0, 0.0, 5.0, 4.0])
    old = torch.tensor([[[2.0, 0.0, 0.0, 0.0]]], dtype=torch.float64)  # the block at column 0 mattered
    assert decide_layers(config=ONE_SWAP, seed=7, **x).slots.tolist() == [[[0]]]
    ranked = decide_by_specificity(x, old, ONE_SWAP, seed=7)
    assert ranked.slots.tolist() == [[[1]]] and ranked.pruned_cols.tolist() == [[[1]]]


def test_without_a_record_specificity_decides_exactly_as_the_score():
    torch.manual_seed(0)
    x = dict(block_scores=torch.rand(3, 4, 4, dtype=torch.float64), candidate_scores=torch.rand(3, 4, 8, dtype=torch.float64),
             col_indices=torch.stack([torch.randperm(8)[:4] for _ in range(12)]).view(3, 4, 4),
             protected=torch.zeros(3, 4, 4, dtype=torch.bool), allowed=torch.ones(3, dtype=torch.bool))
    config = TopologyConfig(prune_fraction=0.5, swap_threshold=1.0, epsilon=0.3)
    a = decide_layers(config=config, seed=3, **x)
    b = decide_by_specificity(x, torch.zeros(3, 4, 8, dtype=torch.float64), config, seed=3)
    for field in ("col_indices", "slots", "grown_cols", "pruned_scores", "grown_scores", "swap", "explored"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_consolidate_records_each_active_blocks_importance_over_the_layer_mean_and_zero_elsewhere():
    model, opt = build(**CHURN)
    train(model, opt, range(3))
    importance = opt.consolidate()
    for name, layer in opt.layers.items():
        old = opt.layer_scores[name].old_importance
        expected = torch.zeros_like(old).scatter_(1, layer.col_indices.long(), importance[name] / importance[name].mean())
        torch.testing.assert_close(old, expected, rtol=1e-12, atol=0)
        assert opt.layer_scores[name].any_record


def run_task_b(rank: str, zero_record: bool = False):
    model, opt = build(**CHURN, consolidate_keep=0.25, consolidate_rank=rank)
    train(model, opt, range(4))
    opt.consolidate()
    if zero_record:
        for s in opt.layer_scores.values():
            s.old_importance.zero_()
    kept = {n: (s.kept.clone(), opt.layers[n].col_indices[s.kept].clone()) for n, s in opt.layer_scores.items()}
    train(model, opt, range(4, 12), on_step=lambda step: [
        pytest.fail(f"{n} moved a kept block at step {step}")
        for n, (mask, cols) in kept.items() if not torch.equal(opt.layers[n].col_indices[mask], cols)])
    return model, opt


def test_score_ranking_after_consolidate_decides_as_before_and_specificity_decides_otherwise():
    _, by_score = run_task_b("score")
    _, no_record = run_task_b("specificity", zero_record=True)  # specificity without a record: the scores
    _, ranked = run_task_b("specificity")  # kept blocks never move (run_task_b checks every step)
    topology = lambda opt: [m.col_indices.clone() for m in opt.layers.values()]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(topology(by_score), topology(no_record)))
    records = lambda opt: [d.to_dict() | {"seconds": 0} for d in opt.history]  # noqa: E731  (timings differ)
    assert records(by_score) == records(no_record)
    assert not all(torch.equal(a, b) for a, b in zip(topology(by_score), topology(ranked)))


def test_specificity_ranking_resumes_bit_identically_and_older_checkpoints_load_without_a_record():
    model, opt = build(**CHURN, consolidate_release=0.25)
    train(model, opt, range(4))
    opt.consolidate()
    train(model, opt, range(4, 5))  # a released slot may still wait for its swap
    state, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    model_b, opt_b = build(**CHURN, consolidate_release=0.25)
    model_b.load_state_dict(weights)
    opt_b.load_state_dict(state)
    assert all(s.any_record for s in opt_b.layer_scores.values())
    train(model, opt, range(5, 11))
    train(model_b, opt_b, range(5, 11))
    for name in opt.layers:
        assert torch.equal(opt.layers[name].col_indices, opt_b.layers[name].col_indices), name
        assert torch.equal(opt.layers[name].values, opt_b.layers[name].values), name
        assert torch.equal(opt.layer_scores[name].old_importance, opt_b.layer_scores[name].old_importance)
    for layer_state in state["topology"]["layers"].values():
        del layer_state["old_importance"]
    model_c, opt_c = build(**CHURN)
    model_c.load_state_dict(weights)
    opt_c.load_state_dict(state)
    assert not any(s.any_record or bool(s.old_importance.any()) for s in opt_c.layer_scores.values())


def test_consolidate_rank_is_validated():
    with pytest.raises(ValueError, match="consolidate_rank='tfidf'"):
        TopologyConfig(consolidate_rank="tfidf")
