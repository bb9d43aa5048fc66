"""The topology in groups of G consecutive block-rows, for the forward that shares activation boxes
between block-rows (``forward_gluon.py``): per group, every slot of its rows as one entry, in
increasing column order, with a running count of the distinct columns seen so far.

Why: the gather forward loads one [BM x B] activation box per slot, so each box is fetched from L2
once for every block-row that uses its column. A program that owns G block-rows and walks its
entries in column order loads a box once, at the first entry of its column, and multiplies it into
each row that has it: at density 0.5 and G = 4, 2.1x fewer activation bytes per multiply.

Each slot is one entry, so a column that appears twice in one row (allowed: the kernels and
``to_dense`` sum repeated columns) is simply multiplied twice. A slot whose column is outside [0, C)
is not an entry: it reads nothing and adds nothing. Built on the device with one sort, no host sync,
the same sizes for every topology (G*K entries a group, the unused ones after ``counts[group]``), so
a CUDA graph or a compiled caller sees no new shapes.
"""

from __future__ import annotations

import torch


def group_entries(col_indices: torch.Tensor, num_cols: int, group: int) -> tuple[torch.Tensor, ...]:
    """(columns, row_slots, distinct [NG, G*K] int32, counts [NG] int32) for NG = ceil(R / G) groups of
    ``group`` block-rows. Group n's entries 0 .. counts[n]-1, in increasing column order (rows, then
    slots, in increasing order within a column): entry e is slot k of block-row n*G + g, with
    row_slots = g*K + k, of column columns[n, e]; distinct[n, e] counts the distinct columns of
    entries 0 .. e, minus one (so an entry starts a new column where it differs from the previous one)."""
    rows, k = col_indices.shape
    num_groups = -(-rows // group)
    width = group * k
    col = col_indices.to(torch.int64)
    col = torch.where((col >= 0) & (col < num_cols), col, num_cols)  # not an entry: sorts after every real one
    if num_groups * group != rows:  # the last group's missing rows have no slots
        col = torch.cat([col, col.new_full((num_groups * group - rows, k), num_cols)])
    col = col.view(num_groups, width)  # entry position before sorting = g*K + k
    position = torch.arange(width, device=col.device)
    order = torch.sort(col * width + position, dim=1).indices  # by column, then row, then slot
    columns = torch.gather(col, 1, order)
    real = columns < num_cols
    starts = torch.ones_like(real)
    starts[:, 1:] = columns[:, 1:] != columns[:, :-1]
    distinct = torch.cumsum(starts.to(torch.int64), dim=1) - 1
    counts = real.sum(dim=1)
    return (torch.where(real, columns, 0).to(torch.int32), order.to(torch.int32), distinct.to(torch.int32),
            counts.to(torch.int32))
