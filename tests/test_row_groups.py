"""The row-group entries (sparsify/kernels/row_groups.py) that the Gluon forward walks, against a plain
Python listing on random topologies with repeated columns, columns outside [0, C) and a last group
with fewer block-rows."""

from __future__ import annotations

import pytest
import torch

from sparsify.kernels.row_groups import group_entries


def listing(col: torch.Tensor, num_cols: int, group: int, n: int) -> list[tuple[int, int, int]]:
    """Group n's slots as (column, row in group, slot), in the order the kernel walks them."""
    rows, k = col.shape
    return sorted(
        (int(col[n * group + g, s]), g, s)
        for g in range(group) for s in range(k)
        if n * group + g < rows and 0 <= col[n * group + g, s] < num_cols
    )


@pytest.mark.parametrize("group", [1, 2, 4])
def test_entries_list_every_slot_with_a_column_in_range_once_in_column_order(group):
    gen = torch.Generator().manual_seed(group)
    for _ in range(60):
        rows = int(torch.randint(1, 10, (1,), generator=gen))
        num_cols = int(torch.randint(1, 8, (1,), generator=gen))
        k = int(torch.randint(1, num_cols + 3, (1,), generator=gen))
        col = torch.randint(-2, num_cols + 2, (rows, k), generator=gen, dtype=torch.int32)
        columns, row_slots, distinct, counts = group_entries(col, num_cols, group)
        num_groups = -(-rows // group)
        assert columns.shape == row_slots.shape == distinct.shape == (num_groups, group * k)
        assert counts.shape == (num_groups,) and columns.dtype == torch.int32
        for n in range(num_groups):
            expected = listing(col, num_cols, group, n)
            assert int(counts[n]) == len(expected)
            seen: list[int] = []
            for e, (c, g, s) in enumerate(expected):
                assert (int(columns[n, e]), int(row_slots[n, e])) == (c, g * k + s)
                if not seen or seen[-1] != c:
                    seen.append(c)
                assert int(distinct[n, e]) == len(seen) - 1


def test_entries_keep_their_shapes_for_every_topology_of_a_layer():
    """A CUDA graph or a compiled caller sees the same sizes whatever the topology holds."""
    first = group_entries(torch.zeros(6, 3, dtype=torch.int32), 5, 4)
    second = group_entries(torch.tensor([[0, 1, 2], [3, 4, 0], [1, 1, 1], [-1, 9, 2], [4, 3, 2], [0, 2, 4]],
                                        dtype=torch.int32), 5, 4)
    assert [t.shape for t in first] == [t.shape for t in second]
