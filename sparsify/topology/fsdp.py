"""FSDP2 (``torch.distributed.fsdp.fully_shard``): topology decisions on row-sharded block values.

Under ``fully_shard`` a layer's ``values [R, K, B, B]`` is a DTensor sharded along dim 0, the
block-rows: rank ``i`` holds rows ``[offset_i, offset_i + R_i)`` (``torch.chunk`` sizes: the last
ranks may hold fewer rows, or none). ``col_indices`` and the stats probe are plain buffers, which
FSDP2 leaves alone: every rank holds the whole topology, and the probe's gradient stays local.

What the topology optimizer does with that (``scores.py`` and ``apply.py``):
  * Level 0 reads the local gradient shard and updates only this rank's rows of ``block_ema``;
  * Level 2 zeroes the other rows and SUMs ``block_ema`` in the same single all-reduce that averages
    the probe statistics, so every rank decides on the full ``[R, K]`` scores of every row;
  * applying a decision writes ``col_indices`` whole on every rank, and values, gradients and
    optimizer state (Adam's ``exp_avg`` ... are DTensors too) only in this rank's rows, in the
    sharded parameter the optimizer holds (the unsharded copy used by forward is re-gathered).

Only 1-D meshes with ``Shard(0)`` are supported (``fully_shard``'s default); anything else raises.
"""

from __future__ import annotations

import io

import torch
import torch.distributed as dist

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch without DTensor: nothing can be sharded
    DTensor, Shard = None, None


def is_sharded(t: torch.Tensor | None) -> bool:
    """True for a DTensor (a parameter, gradient or optimizer state under ``fully_shard``)."""
    return DTensor is not None and isinstance(t, DTensor)


def row_range(t: torch.Tensor) -> tuple[int, int]:
    """``(first, stop)``: the block-rows of ``t``'s dim 0 that this rank holds (all rows if not sharded)."""
    if not is_sharded(t):
        return 0, t.shape[0]
    mesh, placements = t.device_mesh, t.placements
    if mesh.ndim != 1 or len(placements) != 1 or placements[0] != Shard(0):
        raise NotImplementedError(
            f"sparsify.topology: a BlockSparseLinear value tensor placed as {placements} on a {mesh.ndim}-D mesh; "
            "only fully_shard's default (a 1-D mesh, Shard(0): block-rows split across ranks) is supported"
        )
    rows, world, rank = t.shape[0], mesh.size(), mesh.get_local_rank()
    chunk = -(-rows // world)  # torch.chunk: ceil(R / world) rows per rank, the last ones fewer or none
    first = min(rank * chunk, rows)
    stop = min(first + chunk, rows)
    local = t.to_local().shape[0]
    if local != stop - first:
        raise RuntimeError(f"sparsify.topology: rank {rank} holds {local} block-rows, expected rows {first}..{stop}")
    return first, stop


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores (its rows of a DTensor; the tensor itself otherwise). Writes to it
    change the parameter: under ``no_grad`` ``to_local()`` is the shard's own storage."""
    return t.to_local() if is_sharded(t) else t


def group_of_values(values: torch.Tensor):
    """The process group a sharded ``values`` lives on, or None for a plain tensor."""
    return values.device_mesh.get_group() if is_sharded(values) else None


# -- checkpoints with torch.distributed.checkpoint --------------------------------------------------
def _rank_key(group) -> str:
    return f"rank{dist.get_rank(group) if group is not None else 0}"


def checkpoint_state(model: torch.nn.Module, optimizer) -> dict:
    """What to hand to ``torch.distributed.checkpoint.save``: the model (sharded values, replicated
    ``col_indices``), the wrapped optimizer's state (FQN keys, sharded moments) and, under a per-rank
    key, the TopologyOptimizer's own state (statistics differ across ranks: probes are local).

        dcp.save(checkpoint_state(model, opt), checkpoint_id=path)

    Resume with :func:`load_checkpoint_state` on the same world size.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    buffer = io.BytesIO()
    torch.save(optimizer.topology_state_dict(), buffer)
    buffer.seek(0)
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer.optimizer),
        "topology": {_rank_key(optimizer.process_group): buffer},
    }


def load_checkpoint_state(model: torch.nn.Module, optimizer, checkpoint_id) -> None:
    """Load what :func:`checkpoint_state` saved into ``model`` and the TopologyOptimizer ``optimizer``
    (built exactly as before saving: sparsified, sharded, wrapped). Same world size only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    from sparsify.topology.checkpoint import commit, validate  # checkpoint imports scores, which imports this module

    state = checkpoint_state(model, optimizer)
    dcp.load(state, checkpoint_id=checkpoint_id)
    set_model_state_dict(model, state["model"])
    topology = state["topology"][_rank_key(optimizer.process_group)]
    if isinstance(topology, io.BytesIO):  # DCP hands back raw bytes as a stream, or already torch.load-ed
        topology.seek(0)
        topology = torch.load(topology, weights_only=True)
    prepared = validate(optimizer, topology)  # against the model just loaded; before the optimizer changes
    set_optimizer_state_dict(model, optimizer.optimizer, state["optim"])
    commit(optimizer, prepared)
