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
(seed, stream, position) computed with integer arithmetic on the scores' device (:func:`random_bits`),
so every device and every rank gets the same numbers without moving any, and the host never waits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


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


@dataclass
class Decision:
    """A decision for L layers of one shape, still on the device. Pairs ``[L, R, n]`` are in slot order
    within each row; only those with ``swap`` set change anything."""

    col_indices: torch.Tensor  # [L, R, K] the new topologies (dtype of the input)
    changed: torch.Tensor  # [L, R, K] bool
    slots: torch.Tensor  # [L, R, n] int64, the slot of each pair
    pruned_cols: torch.Tensor  # [L, R, n] int64
    grown_cols: torch.Tensor  # [L, R, n] int64
    pruned_scores: torch.Tensor  # [L, R, n] float32
    grown_scores: torch.Tensor  # [L, R, n] float32
    swap: torch.Tensor  # [L, R, n] bool
    explored: torch.Tensor  # [L, R, n] bool
    taken: torch.Tensor  # [L] bool: decided (allowed and finite); False: skipped, nothing changes

    def records(self) -> list[torch.Tensor]:
        """What a host record needs, packed: ``[4, L, R, n]`` int32 (slot, pruned column, grown column,
        swap + 2 * explored) and ``[2, L, R, n]`` float32 (pruned and grown scores)."""
        flags = self.swap.long() + 2 * self.explored.long()
        return [torch.stack([self.slots, self.pruned_cols, self.grown_cols, flags]).int(),
                torch.stack([self.pruned_scores, self.grown_scores])]


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
    ints, floats, taken = to_host(decision.records() + [decision.taken])
    ints, floats = ints[:, 0].long(), floats[:, 0]  # [4, R, n], [2, R, n]
    rows, pairs = (ints[3] & 1).nonzero(as_tuple=True)  # row-major, slot order within a row
    slots, pruned, grown, flags = ints[:, rows, pairs]
    return Plan(
        col_indices=decision.col_indices[0], changed=decision.changed[0],
        rows=rows, slots=slots, pruned_cols=pruned, grown_cols=grown,
        pruned_scores=floats[0, rows, pairs], grown_scores=floats[1, rows, pairs], explored=(flags & 2) > 0,
        skipped=None if bool(taken[0]) else "nonfinite",
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
    an int (see :func:`draw_seed`). All tensors on one device.
    """
    layers, rows, k = col_indices.shape
    num_cols = candidate_scores.shape[2]
    device = col_indices.device
    n = swaps_per_row(k, num_cols, config.prune_fraction)
    finite = torch.isfinite(block_scores).flatten(1).all(1) & torch.isfinite(candidate_scores).flatten(1).all(1)  # [L]
    taken = finite if allowed is None else finite & allowed
    if n == 0:  # no candidates (K = C) or nothing to prune: no pairs
        empty = torch.zeros(layers, rows, 0, dtype=torch.int64, device=device)
        return Decision(col_indices.clone(), torch.zeros_like(col_indices, dtype=torch.bool), empty, empty, empty,
                        empty.float(), empty.float(), empty.bool(), empty.bool(), taken)
    size = layers * rows  # the rows of all layers are decided together: [N = L * R, ...]
    cols = col_indices.reshape(size, k).long()
    block_scores = block_scores.reshape(size, k).float()
    candidate_scores = candidate_scores.reshape(size, num_cols).float()
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
    keys = torch.where(taken_cols, _M32 + 1, bits[size * (1 + n) :].view(size, num_cols))  # [N, C]
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


# -- randomness that every device computes alike ----------------------------------------------------
def draw_seed(generator: torch.Generator) -> int:
    """One 62-bit seed from a CPU generator (no device involved)."""
    return int(torch.randint(0, 2**62, (1,), generator=generator))


def _key(seed: int, stream: int) -> int:
    """A 32-bit key for (seed, stream): splitmix64's finalizer, in Python integers."""
    z = (seed + (stream + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & _M32


def random_bits(seed: int, stream: int, count: int, device) -> torch.Tensor:
    """``[count]`` random 32-bit values, int64 in [0, 2**32): a hash of (seed, stream, position), the
    same on every device. Distinct positions get distinct values (every step is a bijection of 32 bits)."""
    if count > 2**32:
        raise ValueError(f"random_bits: {count} values are more than one stream holds (2**32)")
    # a Weyl sequence (odd multiplier), then the 0x45d9f3b integer hash, in place; products stay below 2**59
    x = torch.arange(count, device=device, dtype=torch.int64).mul_(0x61C88647).add_(_key(seed, stream)).bitwise_and_(_M32)
    shifted = torch.empty_like(x)
    for _ in range(2):
        x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted)).mul_(0x45D9F3B).bitwise_and_(_M32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, 16, out=shifted))


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """Random bits to float32 in [0, 1) with 24 random bits (exact, so equal on every device).
    Consumes ``bits`` (shifted in place)."""
    return bits.bitwise_right_shift_(8).float().mul_(2.0**-24)


# -- the one transfer to the host -----------------------------------------------------------------
def to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """CPU copies of ``tensors`` (all on one device) in ONE device-to-host transfer (one host sync).

    The tensors are viewed as bytes and concatenated, widest dtype first so every piece stays aligned."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    flat = [tensors[i].detach().contiguous().reshape(-1).view(torch.uint8) for i in order]
    host = torch.cat(flat).cpu() if flat else torch.zeros(0, dtype=torch.uint8)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    offset = 0
    for i, piece in zip(order, flat):
        t = tensors[i]
        out[i] = host[offset : offset + piece.numel()].view(t.dtype).view(t.shape)
        offset += piece.numel()
    return out
