"""Applying a Level 2 decision in place: the one place that writes grown blocks.

For every swapped slot (this rank's block-rows under FSDP2): the new block's values (``grow_init``:
Kaiming-uniform x 0.1, drawn on the device from the decision's seed so every rank draws the same, or
zeros), a zero gradient, and zeroed per-element state of the wrapped optimizer (Adam's moments, SGD
momentum). Same tensors, same storage: compiled graphs and CUDA graphs stay valid.
"""

from __future__ import annotations

import math

import torch

from sparsify.topology import fsdp
from sparsify.topology.decide import random_bits, to_uniform
from sparsify.topology.scores import ScoreBank


def apply_swaps(bank: ScoreBank, decisions: list[tuple], swaps: list[tuple], optimizer: torch.optim.Optimizer,
                grow_init: str) -> None:
    """Write the swapped slots' values (``grow_init``), zero their gradient and the wrapped optimizer's
    per-element state (Adam's moments, SGD momentum): this rank's rows (all unless FSDP2 shards them).
    ``swaps``: per group, the host tensors ``(layer in group, row, slot)`` of its swaps. The slots go
    to the device in one non-blocking copy; new values are drawn there, the same on every rank."""
    host, pieces, offset = [], [], 0
    for g, ((group, _, _), (which, row, slot)) in enumerate(zip(decisions, swaps)):
        if which.numel() == 0:
            continue
        bounds = torch.tensor([fsdp.row_range(bank.layers[i].values) for i in group.members])  # [L, 2]
        lo, hi = bounds[which, 0], bounds[which, 1]
        kept = ((row >= lo) & (row < hi)).nonzero().squeeze(1)  # positions in the group's swaps
        host += [row[kept] - lo[kept], slot[kept], kept]
        pieces.append((g, offset, kept.numel(), torch.bincount(which[kept], minlength=len(group.members)).tolist()))
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
        group, seed, _ = decisions[g]
        rows, slots, kept = packed[start : start + 3 * num].view(3, num)
        grown = None
        if grow_init == "kaiming":  # drawn for all the group's swaps, this rank's taken
            total, size = swaps[g][0].numel(), group.block_size
            bound = 0.1 / math.sqrt(group.cols * size)  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound, x 0.1
            grown = to_uniform(random_bits(seed, 1, total * size * size, device)).mul_(2.0).sub_(1.0).mul_(bound)
            grown = grown.view(total, size, size).index_select(0, kept)
            grown = grown.to(bank.layers[group.first].values.dtype)
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
