"""The topology decision (Level 2) as a pure function: scores in, new topology and a plan out.

    decide(block_scores [R, K], candidate_scores [R, C], col_indices [R, K], config, generator,
           protected [R, K] | None) -> Plan
    decide_layers(block_scores [L, R, K], candidate_scores [L, R, C], col_indices [L, R, K], config, seed,
                  protected, allowed [L]) -> Decision   (L layers of one shape at once, all on the device)

Per block-row, vectorized over rows (and layers):
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
never appears twice in a row. A layer with a non-finite score is left as it is. Nothing here mutates
its inputs.

Randomness: one 62-bit seed is drawn from the (CPU) generator; every random number is then a hash of
(seed, stream 0, position) computed on the scores' device (``sparsify.topology.random``), so every
device and every rank gets the same numbers without moving any, and the host never waits.

Scores are compared in their own precision (float32 inputs stay float32; the optimizer's statistics
are float64, so scores spanning the whole float32 range neither overflow nor underflow here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsify.topology.random import BITS_LIMIT, draw_seed, random_bits, to_uniform
from sparsify.topology.records import GroupRecord, Swaps, fetch


@dataclass
class Plan:
    """What a decision changes in one layer (tensors on the scores' device unless noted)."""

    col_indices: torch.Tensor  # [R, K] int32, the new topology
    changed: torch.Tensor  # [R, K] bool, slots whose block was swapped
    rows: torch.Tensor  # [S] int64 (CPU), row of each swap, row-major order
    slots: torch.Tensor  # [S] int64 (CPU)
    pruned_cols: torch.Tensor  # [S] int64 (CPU), the column each swap dropped
    grown_cols: torch.Tensor  # [S] int64 (CPU), the column each swap added
    pruned_scores: torch.Tensor  # [S] (CPU), in the scores' precision, block score of the dropped block
    grown_scores: torch.Tensor  # [S] (CPU), in the scores' precision, candidate score of the added column
    explored: torch.Tensor  # [S] bool (CPU), True where the column was drawn at random
    skipped: str | None = None  # why no decision was taken (e.g. "nonfinite")

    @property
    def num_swaps(self) -> int:
        return int(self.rows.numel())


@dataclass
class Decision:
    """A decision for L layers of one shape, still on the device. Pairs ``[L, R, n]`` are in slot order
    within each row; only those with ``swap`` set change anything."""

    col_indices: torch.Tensor  # [L, R, K] the new topologies (dtype of the input)
    changed: torch.Tensor  # [L, R, K] bool
    slots: torch.Tensor  # [L, R, n] int64, the slot of each pair
    pruned_cols: torch.Tensor  # [L, R, n] int64
    grown_cols: torch.Tensor  # [L, R, n] int64
    pruned_scores: torch.Tensor  # [L, R, n], float32 or float64 like the scores
    grown_scores: torch.Tensor  # [L, R, n]
    swap: torch.Tensor  # [L, R, n] bool
    explored: torch.Tensor  # [L, R, n] bool
    taken: torch.Tensor  # [L] bool: decided (allowed and finite); False: skipped, nothing changes


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
    generator (it gives the seed). Non-finite scores skip the decision (``plan.skipped == "nonfinite"``,
    topology unchanged). The record comes to the host in one transfer.
    """
    decision = decide_layers(block_scores[None], candidate_scores[None], col_indices[None], config,
                             draw_seed(generator), None if protected is None else protected[None])
    (record,), _ = fetch([GroupRecord.of(decision)], [])
    swaps = Swaps.of(record)  # row-major, slot order within a row
    return Plan(
        col_indices=decision.col_indices[0], changed=decision.changed[0],
        rows=swaps.row, slots=swaps.slot, pruned_cols=swaps.pruned_col, grown_cols=swaps.grown_col,
        pruned_scores=swaps.pruned_score, grown_scores=swaps.grown_score, explored=swaps.explored,
        skipped=None if bool(record.taken[0]) else "nonfinite",
    )


def decide_layers(
    block_scores: torch.Tensor,
    candidate_scores: torch.Tensor,
    col_indices: torch.Tensor,
    config,
    seed: int,
    protected: torch.Tensor | None = None,
    allowed: torch.Tensor | None = None,
) -> Decision:
    """:func:`decide` for L layers of one shape, with no host synchronization.

    ``block_scores [L, R, K]``, ``candidate_scores [L, R, C]``, ``col_indices [L, R, K]``, ``protected
    [L, R, K] bool``; ``allowed [L] bool`` skips layers (e.g. statistics that were not finite); ``seed``
    an int (see ``sparsify.topology.random.draw_seed``). All tensors on one device.
    """
    # One function on purpose: the three steps of the module docstring share a dozen [N, n] / [N, C]
    # intermediates (slots, scores, eligibility, random draws); split, they would travel as arguments.
    layers, rows, k = col_indices.shape
    num_cols = candidate_scores.shape[2]
    device = col_indices.device
    n = swaps_per_row(k, num_cols, config.prune_fraction)
    finite = torch.isfinite(block_scores).flatten(1).all(1) & torch.isfinite(candidate_scores).flatten(1).all(1)  # [L]
    taken = finite if allowed is None else finite & allowed
    precision = torch.promote_types(torch.promote_types(block_scores.dtype, candidate_scores.dtype), torch.float32)
    if n == 0:  # no candidates (K = C) or nothing to prune: no pairs
        empty = torch.zeros(layers, rows, 0, dtype=torch.int64, device=device)
        return Decision(col_indices.clone(), torch.zeros_like(col_indices, dtype=torch.bool), empty, empty, empty,
                        empty.to(precision), empty.to(precision), empty.bool(), empty.bool(), taken)
    size = layers * rows  # the rows of all layers are decided together: [N = L * R, ...]
    cols = col_indices.reshape(size, k).long()
    block_scores = block_scores.reshape(size, k).to(precision)
    candidate_scores = candidate_scores.reshape(size, num_cols).to(precision)
    if protected is None:
        protected = torch.zeros(size, k, dtype=torch.bool, device=device)
    protected = protected.reshape(size, k)

    # 1. the n weakest unprotected blocks per row (protected ones sort last and are never eligible)
    ranked = torch.where(protected, torch.full_like(block_scores, math.inf), block_scores)
    weak_slots = torch.sort(ranked, dim=1, stable=True).indices[:, :n]  # [N, n]
    weak_scores = block_scores.gather(1, weak_slots)  # [N, n]
    # every random number of the decision, from one stream: [N] quota draws, [N, n] exploration draws,
    # [N, C] distinct keys that order each row's free columns
    bits = random_bits(seed, 0, size * (1 + n + num_cols), device)
    uniform = to_uniform(bits[: size * (1 + n)])
    quota = config.prune_fraction * k
    whole = math.floor(quota + 1e-9)
    limit = (uniform[:size] < quota - whole).long() + whole  # [N], stochastic rounding
    within = torch.arange(n, device=device)[None, :] < limit[:, None]  # [N, n]
    row_taken = taken[:, None].expand(layers, rows).reshape(size, 1)
    eligible = ~protected.gather(1, weak_slots) & within & row_taken  # [N, n]

    # the n best inactive columns per row
    active = torch.zeros(size, num_cols, dtype=torch.bool, device=device).scatter_(1, cols, True)  # [N, C]
    candidates = torch.where(active, torch.full_like(candidate_scores, -math.inf), candidate_scores)
    best_cols = torch.sort(candidates, dim=1, descending=True, stable=True).indices[:, :n]  # [N, n]
    best_scores = candidates.gather(1, best_cols)  # [N, n]

    # 2. exploration: one draw per pair
    explore = (uniform[size:].view(size, n) < config.epsilon) & eligible  # [N, n]

    # 3. greedy swaps, then exploration picks among columns neither active nor taken greedily
    greedy = eligible & ~explore & (best_scores > config.swap_threshold * weak_scores)  # [N, n]
    taken_cols = _mark(active, best_cols, greedy)  # [N, C]
    keys = torch.where(taken_cols, BITS_LIMIT, bits[size * (1 + n) :].view(size, num_cols))  # [N, C]
    free_order = torch.topk(keys, n, dim=1, largest=False, sorted=True).indices  # [N, n]
    explorer_rank = (explore.long().cumsum(1) - 1).clamp_min(0)  # j-th explorer of its row takes the j-th free column
    random_cols = free_order.gather(1, explorer_rank)  # [N, n]
    grown_cols = torch.where(explore, random_cols, best_cols)  # [N, n]
    swap = greedy | explore  # [N, n]

    new_cols = cols.scatter(1, weak_slots, torch.where(swap, grown_cols, cols.gather(1, weak_slots)))
    changed = torch.zeros(size, k, dtype=torch.bool, device=device).scatter_(1, weak_slots, swap)
    grown_scores = candidate_scores.gather(1, grown_cols)

    order = torch.argsort(weak_slots, dim=1)  # pairs in slot order within each row
    pairs = lambda t: t.gather(1, order).view(layers, rows, n)  # noqa: E731
    slots = weak_slots.gather(1, order)
    return Decision(
        col_indices=new_cols.to(col_indices.dtype).view(layers, rows, k),
        changed=changed.view(layers, rows, k),
        slots=slots.view(layers, rows, n),
        pruned_cols=cols.gather(1, slots).view(layers, rows, n),
        grown_cols=pairs(grown_cols), pruned_scores=pairs(weak_scores), grown_scores=pairs(grown_scores),
        swap=pairs(swap), explored=pairs(explore), taken=taken,
    )


def _mark(active: torch.Tensor, cols: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """``active`` with ``cols[r, i]`` also marked wherever ``where[r, i]``: [R, C] bool."""
    marked = torch.zeros_like(active, dtype=torch.int32).scatter_add_(1, cols, where.int())
    return active | (marked > 0)
