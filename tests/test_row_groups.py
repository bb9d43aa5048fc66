"""The grouped entries (sparsify/kernels/row_groups.py) the Gluon kernels walk, against a plain Python
listing on random topologies with repeated columns, columns outside [0, C) and a last group with fewer
output blocks: the forward's (groups of block-rows, by column) and grad_input's (groups of
block-columns, by block-row)."""

from __future__ import annotations

import pytest
import torch

from sparsify.kernels.row_groups import forward_entries, grad_input_entries


def forward_listing(col, num_cols, group):
    """Per group of block-rows: (box = column, block = r*K + k, target = row in group), by column, row, slot."""
    rows, k = col.shape
    groups = [[] for _ in range(-(-rows // group))]
    for r in range(rows):
        for s in range(k):
            c = int(col[r, s])
            if 0 <= c < num_cols:
                groups[r // group].append((c, r * k + s, r % group))
    return [sorted(g) for g in groups]


def grad_input_listing(col, num_cols, group):
    """Per group of block-columns: (box = block-row, block = r*K + k, target = column in group), by row, slot."""
    rows, k = col.shape
    groups = [[] for _ in range(-(-num_cols // group))]
    for r in range(rows):
        for s in range(k):
            c = int(col[r, s])
            if 0 <= c < num_cols:
                groups[c // group].append((r, r * k + s, c % group))
    return groups


def assert_entries(entries, listing):
    assert entries.bounds.shape == (len(listing), 2)
    for n, expected in enumerate(listing):
        first, end = (int(v) for v in entries.bounds[n])
        assert end - first == len(expected)
        seen = []
        for e, (box, block, target) in zip(range(first, end), expected):
            assert (int(entries.boxes[e]), int(entries.blocks[e]), int(entries.targets[e])) == (box, block, target)
            starts = not seen or seen[-1] != box
            if starts:
                seen.append(box)
            assert int(entries.distinct[e]) == len(seen) - 1
            # the kernels' packed words
            assert (int(entries.loads[e]), int(entries.mmas[e])) == (box * 2 + starts, target * 2 + starts)


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("build, listing", [(forward_entries, forward_listing), (grad_input_entries, grad_input_listing)],
                         ids=["forward", "grad_input"])
def test_entries_list_every_slot_with_a_column_in_range_once_in_walk_order(group, build, listing):
    gen = torch.Generator().manual_seed(group)
    for _ in range(40):
        rows = int(torch.randint(1, 10, (1,), generator=gen))
        num_cols = int(torch.randint(1, 9, (1,), generator=gen))
        k = int(torch.randint(1, num_cols + 3, (1,), generator=gen))
        col = torch.randint(-2, num_cols + 2, (rows, k), generator=gen, dtype=torch.int32)
        entries = build(col, num_cols, group)
        assert entries.group == group and entries.boxes.dtype == torch.int32
        assert_entries(entries, listing(col, num_cols, group))


@pytest.mark.parametrize("build", [forward_entries, grad_input_entries], ids=["forward", "grad_input"])
def test_entries_keep_their_shapes_for_every_topology_of_a_layer(build):
    """A CUDA graph or a compiled caller sees the same sizes whatever the topology holds."""
    first = build(torch.zeros(6, 3, dtype=torch.int32), 5, 4)
    second = build(torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1], [-1, 9, 2], [4, 3, 2], [0, 2, 4]],
                                dtype=torch.int32), 5, 4)
    assert [t.shape for t in first[:7]] == [t.shape for t in second[:7]]


def simulate_ring(entries, first: int, end: int, stages: int, in_flight: int) -> None:
    """The plain grouped kernel's ring, replayed on the host as the kernel counts it: loads walk the
    entries in order, stage + 1 per entry and box buffer + 1 per entry whose load word says it starts a
    new box (both mod stages), issued stages - in_flight entries ahead of the MMAs, which count the same
    from their own words; the ``in_flight`` latest MMAs may still run when a load is issued
    (warpgroup_mma_wait(in_flight)). Checks that every MMA finds its own box and block, and that no load
    overwrites a buffer a running MMA reads."""
    boxes, blocks = entries.boxes.tolist(), entries.blocks.tolist()
    loads, mmas = entries.loads.tolist(), entries.mmas.tolist()
    box_buf, block_buf, reads = {}, {}, {}  # buffer -> what it holds; entry -> (box buffer, stage) its MMA reads
    ahead = stages - in_flight
    load_stage, load_slot = 0, -1

    def load(e):
        nonlocal load_stage, load_slot
        load_slot = (load_slot + (loads[e] & 1)) % stages
        for r in running:
            assert load_stage != reads[r][1], "a block buffer reloaded under a running MMA"
            assert not loads[e] & 1 or load_slot != reads[r][0], "a box reloaded under a running MMA"
        if loads[e] & 1:
            box_buf[load_slot] = loads[e] >> 1
        block_buf[load_stage] = blocks[e]
        load_stage = (load_stage + 1) % stages

    running = []
    for e in range(first, min(first + ahead, end)):
        load(e)
    mma_stage, mma_slot = 0, -1
    for e in range(first, end):
        mma_slot = (mma_slot + (mmas[e] & 1)) % stages
        assert box_buf[mma_slot] == boxes[e] and block_buf[mma_stage] == blocks[e], e
        assert mmas[e] >> 1 == int(entries.targets[e])
        reads[e] = (mma_slot, mma_stage)
        mma_stage = (mma_stage + 1) % stages
        running = list(range(max(first, e - in_flight + 1), e + 1))  # after the wait, these MMAs may still run
        if e + ahead < end:
            load(e + ahead)


@pytest.mark.parametrize("stages,in_flight", [(2, 1), (3, 1), (4, 1), (6, 1), (3, 2), (4, 2), (6, 2), (6, 3), (8, 5)])
@pytest.mark.parametrize("build", [forward_entries, grad_input_entries], ids=["forward", "grad_input"])
def test_the_ring_schedule_gives_every_mma_its_own_buffers_and_never_overwrites_a_running_one(stages, in_flight, build):
    gen = torch.Generator().manual_seed(stages * 10 + in_flight)
    for _ in range(30):
        rows = int(torch.randint(1, 12, (1,), generator=gen))
        num_cols = int(torch.randint(1, 12, (1,), generator=gen))
        k = int(torch.randint(1, num_cols + 2, (1,), generator=gen))
        col = torch.randint(-1, num_cols + 1, (rows, k), generator=gen, dtype=torch.int32)
        for group in (1, 2, 4):
            entries = build(col, num_cols, group)
            for first, end in entries.bounds.tolist():
                simulate_ring(entries, first, end, stages, in_flight)
