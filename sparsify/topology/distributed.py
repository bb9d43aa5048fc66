"""DDP and FSDP2: make every rank take the same topology decision, and prove it.

Everything a decision reads is made identical on every rank before it runs:
  * block-score EMAs come from ``values.grad``, which DDP has already averaged, but the probe
    statistics (activation and error norms) are local to a rank; all of them are averaged in ONE
    bucketed all-reduce per Level 2 (:func:`reduce_`, called by ``ScoreBank.synchronize``), and the
    averages replace the local EMAs;
  * randomness comes from one CPU generator per Level 2 event, seeded from ``config.seed`` and the
    step (``sparsify.topology.random``), so it needs no communication and no checkpointed state;
  * afterwards a checksum of every layer's ``col_indices`` is compared across ranks (one more
    all-reduce, :func:`check_same_topology`) and a divergence raises. Neither collective reads
    anything on the host: the comparison travels with the decision records (one host sync per Level 2).

How to construct DDP: sparsify the model, move it to its device (and dtype), wrap it in
``DistributedDataParallel`` (defaults are fine; ``broadcast_buffers`` may stay on), then build the
``TopologyOptimizer`` with either the DDP wrapper or the inner module. With the wrapper, its
``process_group`` is used; otherwise pass ``process_group=`` or the default group is used. Every rank
must call ``step()`` the same number of times (as DDP itself requires). CPU (gloo) and CUDA (NCCL)
tensors both work: the collectives use SUM and MAX, which every backend supports.

FSDP2 (``fully_shard``): the same, except that each rank only sees the gradient of its own block-rows;
those rows of the block-score EMAs are summed (others zeroed) in the same one all-reduce
(:func:`reduce_`), see ``sparsify.topology.fsdp``. The group is the values' device mesh's group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparsify.topology.fsdp import group_of_values, is_sharded


def unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / FSDP-style ``.module`` wrappers and ``torch.compile``'s ``_orig_mod``."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def process_group_of(model: nn.Module, process_group=None):
    """The group decisions are synchronized over: explicit, else the DDP wrapper's, else that of the
    first parameter sharded by ``fully_shard``, else the default group when torch.distributed is
    initialized, else None (single process)."""
    if process_group is not None:
        return process_group
    if not (dist.is_available() and dist.is_initialized()):
        return None
    for p in unwrap(model).parameters():
        if is_sharded(p):
            return group_of_values(p)
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model.process_group
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return dist.group.WORLD


def world_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def reduce_(averaged: list[torch.Tensor], summed: list[torch.Tensor], group) -> None:
    """Replace ``averaged`` by their means and ``summed`` by their sums over ``group``, in ONE
    all-reduce (``summed`` carries row shards that are zero on every rank but their owner). All tensors
    share a device and a floating dtype (the statistics are float64). A single contiguous tensor is
    reduced in place; several go through one flat buffer."""
    tensors = averaged + summed
    if world_size(group) == 1 or not tensors:
        return
    if len(tensors) == 1 and tensors[0].is_contiguous():
        dist.all_reduce(tensors[0], op=dist.ReduceOp.SUM, group=group)
        if averaged:
            tensors[0].div_(world_size(group))
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    split = sum(t.numel() for t in averaged)
    flat[:split].div_(world_size(group))
    pieces = flat.split([t.numel() for t in tensors])
    torch._foreach_copy_(tensors, [piece.view_as(t) for piece, t in zip(pieces, tensors)])


def topology_checksum(col_indices: torch.Tensor) -> torch.Tensor:
    """A position-sensitive int64 hash of one topology (on its device, no host sync)."""
    return topology_checksums(col_indices[None])[0]


def topology_checksums(col_indices: torch.Tensor) -> torch.Tensor:
    """:func:`topology_checksum` of each of L same-shaped topologies ``[L, ...]``: ``[L]`` int64."""
    cols = col_indices.reshape(col_indices.shape[0], -1).long()
    position = torch.arange(cols.shape[1], device=cols.device, dtype=torch.int64)
    weight = (position * 2_654_435_761 + 97_531) % 2_147_483_629 + 1  # < 2**31
    return (((cols + 1) * weight) % 2_147_483_647).sum(1)


def check_same_topology(names: list[str], topologies: list[torch.Tensor], group, step: int, *, wait: bool = True):
    """Raise RuntimeError naming the layers whose topology differs across ranks (one all-reduce).

    With ``wait=False`` nothing is read on the host: the result is ``[L]`` bool on the device (True
    where ranks differ), or None in a single process; hand its host copy to :func:`raise_if_diverged`."""
    if world_size(group) == 1 or not topologies:
        return None
    runs = [[topologies[0]]]  # one batched checksum per run of same-shaped topologies
    for t in topologies[1:]:
        if t.shape == runs[-1][0].shape:
            runs[-1].append(t)
        else:
            runs.append([t])
    sums = torch.cat([topology_checksums(torch.stack(run)) for run in runs])  # [L]
    both = torch.cat([sums, -sums])  # max of -x is -min of x: MAX and MIN in one collective
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    differ = both[: len(names)] != -both[len(names) :]
    if wait:
        raise_if_diverged(names, differ.cpu(), step)
    return differ


def raise_if_diverged(names: list[str], differ: torch.Tensor | None, step: int) -> None:
    """Raise RuntimeError naming the layers flagged in ``differ`` ([L] bool, on the host)."""
    if differ is None or not bool(differ.any()):
        return
    bad = [name for name, d in zip(names, differ.tolist()) if d]
    raise RuntimeError(
        f"topology diverged across ranks after the decision at step {step} in {len(bad)} layer(s): "
        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Every rank must call step() equally often "
        "and hold the same model and optimizer state (load the same checkpoint on every rank)"
    )
