"""The topology in groups of G consecutive block-rows, for the forward that shares activation boxes
between block-rows (``forward_rows.py``): per group, the columns any of its rows uses, each listed
once, and for each listed column which slot of each row reads it (or -1).

Why: the gather forward loads one [BM x B] activation box per slot, so each box is fetched from L2
once for every block-row that uses its column. A program that owns G block-rows loads each box once
and multiplies it into every row of the group that has it: at density 0.5 and G = 4, 2.1x fewer
activation bytes per multiply (benchmarks/NOTES.md).

A column that appears twice in one row (allowed: the kernels and ``to_dense`` sum repeated columns)
is listed twice, its n-th listing carrying each row's n-th slot of it, so every slot is read exactly
once. A column outside [0, C) is not listed: it reads nothing and adds nothing. Built on the device
with sorts and scatters, no host sync, the same sizes for every topology (G*K listings a group, the
unused ones after ``counts[group]``), so a CUDA graph or a compiled caller sees no new shapes.
"""

from __future__ import annotations

import torch


def row_groups(col_indices: torch.Tensor, num_cols: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(columns [NG, G*K] int32, slots [NG, G*K, G] int32, counts [NG] int32) for NG = ceil(R / G)
    groups of ``group`` block-rows: group n's listings 0 .. counts[n]-1 are its columns in increasing
    order; slots[n, u, g] is the slot k of block-row n*G + g that reads columns[n, u], or -1."""
    rows, k = col_indices.shape
    device = col_indices.device
    num_groups = -(-rows // group)
    width = group * k
    col = col_indices.to(torch.int64)
    col = torch.where((col >= 0) & (col < num_cols), col, num_cols)  # not listed: sorts after every real column
    if num_groups * group != rows:  # the last group's missing rows have no slots
        col = torch.cat([col, col.new_full((num_groups * group - rows, k), num_cols)])
    col = col.view(num_groups, width)  # listing position = g*K + k
    position = torch.arange(width, device=device)
    row_of = (position // k).expand(num_groups, width)
    slot_of = (position % k).expand(num_groups, width)

    # n-th occurrence of a column within one row: sort by (column, row); position in its run
    by_row = torch.sort(col * group + row_of, dim=1, stable=True)
    key = by_row.values
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[:, 1:] = key[:, 1:] != key[:, :-1]
    run_start = torch.cummax(torch.where(starts, position, 0), dim=1).values
    occurrence = position - run_start
    col_sorted = torch.gather(col, 1, by_row.indices)
    row_sorted = torch.gather(row_of, 1, by_row.indices)
    slot_sorted = torch.gather(slot_of, 1, by_row.indices)

    # one listing per (column, occurrence): sort by it (rows stay in order inside a listing)
    listing_key = col_sorted * k + occurrence
    by_listing = torch.sort(listing_key, dim=1, stable=True)
    lkey = by_listing.values
    new = torch.ones_like(lkey, dtype=torch.bool)
    new[:, 1:] = lkey[:, 1:] != lkey[:, :-1]
    listing = torch.cumsum(new.to(torch.int64), dim=1) - 1
    listed_col = torch.gather(col_sorted, 1, by_listing.indices)
    listed_row = torch.gather(row_sorted, 1, by_listing.indices)
    listed_slot = torch.gather(slot_sorted, 1, by_listing.indices)
    real = listed_col < num_cols
    listing = torch.where(real, listing, width)  # unlisted entries land in a spare listing, dropped below

    columns = torch.zeros(num_groups, width + 1, dtype=torch.int64, device=device)
    columns.scatter_(1, listing, torch.where(real, listed_col, 0))
    slots = torch.full((num_groups, (width + 1) * group), -1, dtype=torch.int64, device=device)
    slots.scatter_(1, listing * group + listed_row, torch.where(real, listed_slot, -1))
    counts = (new & real).sum(dim=1)
    slots = slots.view(num_groups, width + 1, group)[:, :width]
    return (columns[:, :width].to(torch.int32).contiguous(), slots.to(torch.int32).contiguous(),
            counts.to(torch.int32))
