"""decide(): the pure prune/grow function, its tie-breaking and its edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from sparsify.block_ell import check_col_indices
from sparsify.topology import TopologyConfig, decide
from sparsify.topology.decide import decide_layers, swaps_per_row
from sparsify.topology.random import random_bits, to_uniform
from sparsify.topology.records import to_host


def _random_topology(rows: int, k: int, cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(cols, generator=g)[:k] for _ in range(rows)]).to(torch.int32)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _apply_record(col_indices: torch.Tensor, plan) -> torch.Tensor:
    out = col_indices.clone()
    for r, s, old, new in zip(plan.rows.tolist(), plan.slots.tolist(), plan.pruned_cols.tolist(), plan.grown_cols.tolist()):
        assert int(col_indices[r, s]) == old
        out[r, s] = new
    return out


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("epsilon", [0.0, 0.3, 1.0])
def test_decisions_keep_k_columns_per_row_without_duplicates_and_match_their_record(seed, epsilon):
    rows, k, cols = 64, 5, 12
    topology = _random_topology(rows, k, cols, seed)
    g = torch.Generator().manual_seed(seed)
    block, cand = torch.rand(rows, k, generator=g), 3 * torch.rand(rows, cols, generator=g)
    config = TopologyConfig(prune_fraction=0.5, epsilon=epsilon)
    plan = decide(block, cand, topology, config, _gen(seed))
    assert plan.col_indices.shape == topology.shape and plan.col_indices.dtype == torch.int32
    check_col_indices(plan.col_indices, cols, "decide")
    assert plan.num_swaps > 0
    assert torch.equal(_apply_record(topology, plan), plan.col_indices)
    assert torch.equal(plan.changed, plan.col_indices != topology)
    per_row = torch.bincount(plan.rows, minlength=rows)
    assert int(per_row.max()) <= swaps_per_row(k, cols, 0.5) == 3


def test_decide_does_not_mutate_its_inputs():
    topology = _random_topology(8, 3, 8)
    block, cand = torch.rand(8, 3), 5 * torch.rand(8, 8)
    copies = [t.clone() for t in (topology, block, cand)]
    decide(block, cand, topology, TopologyConfig(prune_fraction=1.0, epsilon=0.5), _gen())
    assert all(torch.equal(a, b) for a, b in zip(copies, (topology, block, cand)))


def test_same_generator_seed_gives_the_same_decision_and_another_seed_explores_differently():
    topology = _random_topology(32, 4, 16)
    block, cand = torch.rand(32, 4), torch.rand(32, 16)
    config = TopologyConfig(prune_fraction=0.5, epsilon=0.5)
    a, b = (decide(block, cand, topology, config, _gen(7)) for _ in range(2))
    c = decide(block, cand, topology, config, _gen(8))
    assert torch.equal(a.col_indices, b.col_indices) and torch.equal(a.grown_cols, b.grown_cols)
    assert not torch.equal(a.col_indices, c.col_indices)


def test_weakest_block_is_swapped_for_the_best_candidate_only_above_the_threshold():
    topology = torch.tensor([[0, 1, 2, 3]], dtype=torch.int32)
    block = torch.tensor([[4.0, 1.0, 3.0, 2.0]])  # slot 1 is the weakest, then slot 3
    cand = torch.tensor([[9.0, 9.0, 9.0, 9.0, 1.0, 2.9, 1.6, 0.5]])  # best inactive: column 5, then 6
    config = TopologyConfig(prune_fraction=0.5, swap_threshold=1.5, epsilon=0.0)
    plan = decide(block, cand, topology, config, _gen())
    # pairs: (slot 1, score 1.0) with column 5 (2.9 > 1.5): swapped; (slot 3, 2.0) with column 6 (1.6 < 3.0): kept
    assert plan.col_indices.tolist() == [[0, 5, 2, 3]]
    assert list(zip(plan.rows.tolist(), plan.slots.tolist(), plan.pruned_cols.tolist(), plan.grown_cols.tolist())) == [(0, 1, 1, 5)]
    assert plan.pruned_scores.tolist() == [1.0] and plan.grown_scores.tolist() == pytest.approx([2.9])


def test_a_candidate_exactly_at_the_threshold_does_not_swap():
    topology = torch.tensor([[0]], dtype=torch.int32)
    config = TopologyConfig(prune_fraction=1.0, epsilon=0.0)
    plan = decide(torch.tensor([[2.0]]), torch.tensor([[0.0, 3.0]]), topology, config, _gen())
    assert plan.num_swaps == 0
    plan = decide(torch.tensor([[2.0]]), torch.tensor([[0.0, 3.01]]), topology, config, _gen())
    assert plan.col_indices.tolist() == [[1]]


def test_ties_prune_the_lowest_slot_and_grow_the_lowest_column():
    topology = torch.tensor([[6, 2, 4], [1, 0, 7]], dtype=torch.int32)
    block = torch.ones(2, 3)
    cand = torch.full((2, 8), 10.0)
    plan = decide(block, cand, topology, TopologyConfig(prune_fraction=1 / 3, epsilon=0.0), _gen())
    assert plan.col_indices.tolist() == [[0, 2, 4], [2, 0, 7]]


def test_all_scores_equal_means_no_swaps_without_exploration():
    topology = _random_topology(16, 4, 8)
    plan = decide(torch.ones(16, 4), torch.ones(16, 8), topology, TopologyConfig(prune_fraction=0.5, epsilon=0.0), _gen())
    assert plan.num_swaps == 0 and torch.equal(plan.col_indices, topology)
    plan = decide(torch.zeros(16, 4), torch.zeros(16, 8), topology, TopologyConfig(epsilon=0.0), _gen())
    assert plan.num_swaps == 0


def test_full_density_has_no_candidates_and_makes_no_swaps():
    topology = torch.arange(4, dtype=torch.int32).repeat(3, 1)  # K == C
    plan = decide(torch.rand(3, 4), torch.rand(3, 4), topology, TopologyConfig(prune_fraction=1.0, epsilon=1.0), _gen())
    assert plan.num_swaps == 0 and plan.skipped is None and torch.equal(plan.col_indices, topology)


def test_more_requested_swaps_than_candidates_swaps_at_most_the_free_columns():
    topology = torch.tensor([[0, 1, 2]] * 4, dtype=torch.int32)  # K = 3, C = 4: one free column per row
    plan = decide(torch.zeros(4, 3), torch.full((4, 4), 5.0), topology, TopologyConfig(prune_fraction=1.0, epsilon=0.0), _gen())
    assert plan.num_swaps == 4
    check_col_indices(plan.col_indices, 4, "decide")
    assert (plan.col_indices == 3).sum(1).tolist() == [1, 1, 1, 1]


def test_one_block_per_row_can_still_move():
    topology = torch.tensor([[0], [3]], dtype=torch.int32)  # K = 1
    cand = torch.tensor([[0.0, 1.0, 9.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    plan = decide(torch.tensor([[1.0], [1.0]]), cand, topology, TopologyConfig(prune_fraction=1.0, epsilon=0.0), _gen())
    assert plan.col_indices.tolist() == [[2], [3]]


def test_a_fractional_quota_is_rounded_stochastically_so_small_rows_swap_the_fraction_on_average():
    rows, k, cols = 4000, 4, 16
    topology = _random_topology(rows, k, cols)
    block, cand = torch.zeros(rows, k), torch.ones(rows, cols)  # every eligible pair would swap
    plan = decide(block, cand, topology, TopologyConfig(prune_fraction=0.1, epsilon=0.0), _gen())
    assert int(torch.bincount(plan.rows, minlength=rows).max()) == 1  # ceil(0.4) = 1 pair at most
    assert plan.num_swaps / (rows * k) == pytest.approx(0.1, abs=0.01)  # not 25%


def test_exploration_grows_random_unused_columns_regardless_of_scores():
    rows, k, cols = 200, 4, 16
    topology = _random_topology(rows, k, cols)
    block, cand = torch.full((rows, k), 100.0), torch.zeros(rows, cols)  # no greedy swap is ever worth it
    plan = decide(block, cand, topology, TopologyConfig(prune_fraction=0.5, epsilon=1.0), _gen())
    assert plan.num_swaps == rows * 2 and bool(plan.explored.all())
    check_col_indices(plan.col_indices, cols, "decide")
    assert len(set(plan.grown_cols.tolist())) > cols // 2  # spread over many columns, not a fixed choice
    few = decide(block, cand, topology, TopologyConfig(prune_fraction=0.5, epsilon=0.05), _gen())
    assert 0 < few.num_swaps < rows * 2 * 0.15


def test_protected_slots_are_never_pruned():
    topology = _random_topology(50, 4, 8)
    protected = torch.zeros(50, 4, dtype=torch.bool)
    protected[:, 0] = True
    protected[0] = True
    block = torch.zeros(50, 4)
    plan = decide(block, torch.full((50, 8), 1.0), topology, TopologyConfig(prune_fraction=1.0, epsilon=0.5), _gen(), protected)
    assert plan.num_swaps > 0
    assert torch.equal(plan.col_indices[protected], topology[protected])
    assert not bool(plan.changed[protected].any())


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_scores_skip_the_decision_and_leave_the_topology(bad):
    topology = _random_topology(4, 2, 4)
    block = torch.rand(4, 2)
    block[1, 1] = bad
    plan = decide(block, torch.rand(4, 4) * 10, topology, TopologyConfig(epsilon=1.0), _gen())
    assert plan.skipped == "nonfinite" and plan.num_swaps == 0 and torch.equal(plan.col_indices, topology)


def test_swaps_per_row_is_a_ceiling_of_the_fraction_capped_by_free_columns():
    assert swaps_per_row(20, 40, 0.1) == 2
    assert swaps_per_row(2, 4, 0.1) == 1
    assert swaps_per_row(4, 4, 0.5) == 0
    assert swaps_per_row(3, 4, 1.0) == 1
    assert swaps_per_row(8, 16, 0.0) == 0


def test_layers_decided_together_are_each_valid_and_skipped_layers_are_left_alone():
    layers, rows, k, cols = 3, 32, 4, 12
    topology = torch.stack([_random_topology(rows, k, cols, seed) for seed in range(layers)])
    g = torch.Generator().manual_seed(0)
    block, cand = torch.rand(layers, rows, k, generator=g), 3 * torch.rand(layers, rows, cols, generator=g)
    cand[2, 0, 0] = math.nan  # layer 2 has a non-finite score; layer 1 is not allowed (e.g. flagged statistics)
    allowed = torch.tensor([True, False, True])
    d = decide_layers(block, cand, topology, TopologyConfig(prune_fraction=0.5, epsilon=0.3), 7, allowed=allowed)
    assert d.taken.tolist() == [True, False, False]
    assert torch.equal(d.col_indices[1:], topology[1:]) and not bool(d.swap[1:].any()) and not bool(d.changed[1:].any())
    check_col_indices(d.col_indices[0], cols, "decide_layers")
    assert bool(d.swap[0].any()) and torch.equal(d.changed[0], d.col_indices[0] != topology[0])
    # every swapped pair names its slot, the column it dropped and the one it grew
    layer, row, pair = d.swap.nonzero(as_tuple=True)
    slots = d.slots[layer, row, pair]
    assert torch.equal(topology[layer, row, slots].long(), d.pruned_cols[layer, row, pair])
    assert torch.equal(d.col_indices[layer, row, slots].long(), d.grown_cols[layer, row, pair])


def test_random_numbers_are_a_fixed_function_of_seed_stream_and_position():
    bits = random_bits(12345, 0, 1000, "cpu")
    assert bits.unique().numel() == 1000 and int(bits.min()) >= 0 and int(bits.max()) < 2**32  # distinct keys
    assert bits[:3].tolist() == [2561064575, 3180275736, 3444791479]  # a change here changes every decision
    assert torch.equal(bits[:4], random_bits(12345, 0, 4, "cpu")) and not torch.equal(bits[:4], random_bits(12345, 1, 4, "cpu"))
    u = to_uniform(random_bits(1, 0, 100_000, "cpu"))
    assert u.dtype == torch.float32 and 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.01) and float((u < 0.05).float().mean()) == pytest.approx(0.05, abs=0.005)


def test_to_host_brings_tensors_of_any_dtype_back_in_one_piece():
    tensors = [torch.arange(3, dtype=torch.int32), torch.tensor([True, False]), torch.tensor(2.5, dtype=torch.float64),
               torch.rand(2, 3), torch.arange(5, dtype=torch.int64).view(5, 1)]
    for mine, theirs in zip(tensors, to_host(tensors)):
        assert theirs.dtype == mine.dtype and theirs.shape == mine.shape and torch.equal(theirs, mine)
