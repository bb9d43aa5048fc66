"""The topology decision (Level 2) as a pure function: scores in, new topology and a plan out.

    decide(block_scores [R, K], candidate_scores [R, C], col_indices [R, K], config, generator,
           protected [R, K] | None) -> Plan

Per block-row, vectorized over rows:
  1. Up to ``n = min(ceil(prune_fraction * K), C - K)`` prunable pairs: the n lowest-scoring unprotected
     active blocks (ascending; ties go to the lowest slot), paired with the n best inactive
     columns (descending; ties go to the lowest column). Weakest block meets best candidate.
     A row's quota ``prune_fraction * K`` is rounded stochastically (floor, plus one with the
     fractional part's probability), so at most ``prune_fraction`` of the blocks are swapped on
     average even where K is small (K = 4 and 0.1 would otherwise round up to 25%).
  2. Each pair explores with probability ``epsilon``: its block is swapped regardless of scores for a
     random inactive column that no greedy swap of the row takes.
  3. Every other pair swaps when ``candidate > swap_threshold * block_score``.
The grown column takes the pruned block's slot, so K and slot positions never change and a column
never appears twice in a row. Nothing here mutates its inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Plan:
    """What a decision changes in one layer (tensors on the scores' device unless noted)."""

    col_indices: torch.Tensor  # [R, K] int32, the new topology
    changed: torch.Tensor  # [R, K] bool, slots whose block was swapped
    rows: torch.Tensor  # [S] int64 (CPU), row of each swap, row-major order
    slots: torch.Tensor  # [S] int64 (CPU)
    pruned_cols: torch.Tensor  # [S] int64 (CPU), the column each swap dropped
    grown_cols: torch.Tensor  # [S] int64 (CPU), the column each swap added
    pruned_scores: torch.Tensor  # [S] float32 (CPU), block score of the dropped block
    grown_scores: torch.Tensor  # [S] float32 (CPU), candidate score of the added column
    explored: torch.Tensor  # [S] bool (CPU), True where the column was drawn at random
    skipped: str | None = None  # why no decision was taken (e.g. "nonfinite")

    @property
    def num_swaps(self) -> int:
        return int(self.rows.numel())


def swaps_per_row(k: int, num_cols: int, prune_fraction: float) -> int:
    """The most blocks of a row one decision may swap: ``min(ceil(fraction * K), C - K)``."""
    if prune_fraction <= 0:
        return 0
    return max(0, min(k, math.ceil(prune_fraction * k - 1e-9), num_cols - k))


def decide(
    block_scores: torch.Tensor,
    candidate_scores: torch.Tensor,
    col_indices: torch.Tensor,
    config,
    generator: torch.Generator,
    protected: torch.Tensor | None = None,
) -> Plan:
    """Choose which blocks to prune and which columns to grow; see the module docstring.

    ``config`` needs ``prune_fraction``, ``swap_threshold`` and ``epsilon``; ``generator`` is a CPU
    generator (random draws are made on the CPU, then moved, so every device and rank agrees).
    Non-finite scores skip the decision (``plan.skipped == "nonfinite"``, topology unchanged).
    """
    rows, k = col_indices.shape
    num_cols = candidate_scores.shape[1]
    device = col_indices.device
    n = swaps_per_row(k, num_cols, config.prune_fraction)
    finite = bool(torch.isfinite(block_scores).all()) and bool(torch.isfinite(candidate_scores).all())
    if n == 0 or rows == 0 or not finite:
        return _no_change(col_indices, None if finite else "nonfinite")
    cols = col_indices.long()
    block_scores = block_scores.float()
    if protected is None:
        protected = torch.zeros(rows, k, dtype=torch.bool, device=device)

    # 1. the n weakest unprotected blocks per row (protected ones sort last and are never eligible)
    ranked = torch.where(protected, torch.full_like(block_scores, math.inf), block_scores)
    weak_slots = torch.sort(ranked, dim=1, stable=True).indices[:, :n]  # [R, n]
    weak_scores = block_scores.gather(1, weak_slots)  # [R, n]
    quota = config.prune_fraction * k
    whole = math.floor(quota + 1e-9)
    limit = whole + (torch.rand(rows, generator=generator) < quota - whole).long()  # [R], stochastic rounding
    within = torch.arange(n, device=device)[None, :] < limit.to(device)[:, None]  # [R, n]
    eligible = ~protected.gather(1, weak_slots) & within  # [R, n]

    # the n best inactive columns per row
    active = torch.zeros(rows, num_cols, dtype=torch.bool, device=device).scatter_(1, cols, True)  # [R, C]
    candidates = torch.where(active, torch.full_like(candidate_scores, -math.inf), candidate_scores.float())
    best_cols = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :n]  # [R, n]
    best_scores = candidates.gather(1, best_cols)  # [R, n]

    # 2. exploration draws (CPU generator, one draw per pair and one noise value per position)
    explore = (torch.rand(rows, n, generator=generator) < config.epsilon).to(device) & eligible  # [R, n]
    noise = torch.rand(rows, num_cols, generator=generator).to(device)  # [R, C]

    # 3. greedy swaps, then exploration picks among columns neither active nor taken greedily
    greedy = eligible & ~explore & (best_scores > config.swap_threshold * weak_scores)  # [R, n]
    taken = _mark(active, best_cols, greedy)  # [R, C]
    free_order = torch.sort(torch.where(taken, torch.full_like(noise, math.inf), noise), dim=1, stable=True).indices
    explorer_rank = (explore.long().cumsum(1) - 1).clamp_min(0)  # j-th explorer of its row takes the j-th free column
    random_cols = free_order.gather(1, explorer_rank)  # [R, n]
    grown_cols = torch.where(explore, random_cols, best_cols)  # [R, n]
    swap = greedy | explore  # [R, n]

    new_cols = cols.clone()
    new_cols.scatter_(1, weak_slots, torch.where(swap, grown_cols, cols.gather(1, weak_slots)))
    changed = torch.zeros(rows, k, dtype=torch.bool, device=device).scatter_(1, weak_slots, swap)
    grown_scores = candidate_scores.float().gather(1, grown_cols)

    # the record, in row-major slot order (one host transfer)
    order = torch.argsort(weak_slots, dim=1)  # pairs in slot order within each row
    swap_o, slots_o = swap.gather(1, order), weak_slots.gather(1, order)
    picks = swap_o.flatten().nonzero().squeeze(1).cpu()
    flat = lambda t: t.gather(1, order).flatten().cpu()[picks]  # noqa: E731
    return Plan(
        col_indices=new_cols.to(col_indices.dtype),
        changed=changed,
        rows=(torch.arange(rows).repeat_interleave(n))[picks],
        slots=slots_o.flatten().cpu()[picks],
        pruned_cols=cols.gather(1, slots_o).flatten().cpu()[picks],
        grown_cols=flat(grown_cols),
        pruned_scores=flat(weak_scores),
        grown_scores=flat(grown_scores),
        explored=flat(explore),
    )


def _mark(active: torch.Tensor, cols: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``active`` with ``cols[r, i]`` also marked wherever ``where[r, i]``: [R, C] bool."""
    marked = torch.zeros_like(active, dtype=torch.int32).scatter_add_(1, cols, where.int())
    return active | (marked > 0)


def _no_change(col_indices: torch.Tensor, skipped: str | None) -> Plan:
    empty = torch.zeros(0, dtype=torch.int64)
    return Plan(
        col_indices=col_indices.clone(),
        changed=torch.zeros(col_indices.shape, dtype=torch.bool, device=col_indices.device),
        rows=empty, slots=empty, pruned_cols=empty, grown_cols=empty,
        pruned_scores=torch.zeros(0), grown_scores=torch.zeros(0),
        explored=torch.zeros(0, dtype=torch.bool), skipped=skipped,
    )
