"""Applying Level 2 decisions in place: the only writer of a decision.

Run after the event's one host synchronization, from the decisions (on the device) and the host's list
of their swaps. For every group of same-shaped layers:

  * the statistics absorb the decision (``ScoreBank.absorb``): the changed slots' block-score EMAs and
    ages start afresh;
  * every layer whose topology changed gets its new ``col_indices`` (written in place) and its
    ``topology_version`` bumped; layers a decision left alone are not written at all;
  * the swapped slots' blocks (this rank's block-rows: all of them unless FSDP2 shards them): values
    drawn by ``grow_init`` (Kaiming-uniform x 0.1, from the decision's seed so every rank draws the
    same, or zeros), a zero gradient, zeroed per-element state of the wrapped optimizer (Adam's
    moments, SGD momentum).

Same tensors, same storage: compiled graphs and CUDA graphs stay valid. ``layer.topology_version`` is
a plain int that grows with every write of the layer's ``col_indices`` here, so metadata derived from
the topology can be cached against it (so can ``col_indices._version``, which the same writes bump).
"""

from __future__ import annotations

import math

import torch

from sparsify.layer import BlockSparseLinear
from sparsify.topology import fsdp
from sparsify.topology.random import random_bits, to_uniform
from sparsify.topology.records import Swaps
from sparsify.topology.scores import ScoreBank, ShapeGroup

GROW_STREAM = 1  # the random stream of grown values (stream 0 is the decision's)


def apply_decisions(bank: ScoreBank, events: list[tuple], optimizer: torch.optim.Optimizer, config) -> None:
    """Apply every group's decision. ``events``: per group, ``(group, seed, decision, host swaps)``."""
    written, sources = [], []
    for group, _, decision, swaps in events:
        bank.absorb(group, decision, config.scorer)
        for j, num in enumerate(swaps.per_layer(len(group.members))):
            if num:
                written.append(bank.layers[group.members[j]])
                sources.append(decision.col_indices[j])
    if written:
        torch._foreach_copy_([layer.col_indices for layer in written], sources)
        for layer in written:
            bump_version(layer)
    _write_blocks(bank, [(group, seed, swaps) for group, seed, _, swaps in events], optimizer, config.grow_init)


def bump_version(layer: BlockSparseLinear) -> None:
    """Mark ``layer.col_indices`` as changed."""
    layer.topology_version = getattr(layer, "topology_version", 0) + 1


def _write_blocks(bank: ScoreBank, events: list[tuple[ShapeGroup, int, Swaps]], optimizer: torch.optim.Optimizer,
                 grow_init: str) -> None:
    """Write the swapped slots' values, zero their gradient and the wrapped optimizer's per-element
    state. ``events``: per group, ``(group, seed, host swaps)``. This rank's slots go to the device in
    one non-blocking copy; new values are drawn there, the same on every rank."""
    host, pieces, offset = [], [], 0
    for g, (group, _, swaps) in enumerate(events):
        if swaps.layer.numel() == 0:
            continue
        bounds = torch.tensor([fsdp.row_range(bank.layers[i].values) for i in group.members])  # [L, 2]
        lo, hi = bounds[swaps.layer, 0], bounds[swaps.layer, 1]
        kept = ((swaps.row >= lo) & (swaps.row < hi)).nonzero().squeeze(1)  # positions in the group's swaps
        host += [swaps.row[kept] - lo[kept], swaps.slot[kept], kept]
        pieces.append((g, offset, kept.numel(), torch.bincount(swaps.layer[kept], minlength=len(group.members)).tolist()))
        offset += 3 * kept.numel()
    if not offset:
        return
    device = bank.device
    packed = torch.cat(host)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    zeros: dict[torch.dtype, torch.Tensor] = {}

    def zero(dtype: torch.dtype) -> torch.Tensor:
        if dtype not in zeros:
            zeros[dtype] = torch.zeros((), device=device, dtype=dtype)
        return zeros[dtype]

    for g, start, num, per_layer in pieces:
        group, seed, swaps = events[g]
        rows, slots, kept = packed[start : start + 3 * num].view(3, num)
        grown = None if grow_init == "zeros" else _kaiming(group, seed, swaps.layer.numel(), kept, device)
        first = 0
        for index, count in zip(group.members, per_layer):
            if count == 0:
                continue
            values, part = bank.layers[index].values, slice(first, first + count)
            where = (rows[part], slots[part])
            first += count
            fsdp.local(values.data).index_put_(where, zero(values.dtype) if grown is None else grown[part].to(values.dtype))
            if values.grad is not None:
                fsdp.local(values.grad).index_put_(where, zero(values.grad.dtype))
            for state in optimizer.state.get(values, {}).values():
                if torch.is_tensor(state) and state.shape == values.shape:  # Adam exp_avg / exp_avg_sq, SGD momentum
                    fsdp.local(state).index_put_(where, zero(state.dtype))


def _kaiming(group: ShapeGroup, seed: int, total: int, kept: torch.Tensor, device) -> torch.Tensor:
    """``[len(kept), B, B]`` grown values: drawn for all ``total`` swaps of the group (the same on every
    rank), this rank's ``kept`` taken. nn.Linear's kaiming_uniform(a=sqrt(5)) bound, x 0.1."""
    size = group.block_size
    bound = 0.1 / math.sqrt(group.cols * size)
    grown = to_uniform(random_bits(seed, GROW_STREAM, total * size * size, device)).mul_(2.0).sub_(1.0).mul_(bound)
    return grown.view(total, size, size).index_select(0, kept)
