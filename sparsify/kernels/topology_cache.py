"""Metadata derived from a topology (the column view grad_input walks, the slot table of the masked-dense
tiles), built once per state of ``col_indices`` instead of on every call.

An entry belongs to one ``col_indices`` tensor object (held weakly: it goes when the tensor goes) and is
used while that tensor's version counter and data pointer are what they were when the entry was built.
Every in-place write made through PyTorch bumps the version counter: ``copy_`` and ``_foreach_copy_``
(how the topology optimizer applies a decision), ``load_state_dict``, indexed assignment, in or out of
``no_grad``. A write that bypasses it (through ``.data``, or by a raw kernel) would not be seen; the
library writes topologies only the first way, and tests/test_topology_cache.py holds each of those to it.
Assigning a new tensor (``layer.col_indices = t``, ``.data = t``) changes the object or the data pointer.

Nothing is cached, and the metadata is built as before, where a cached tensor could be wrong later:
under CUDA graph capture (each replay must rebuild from what ``col_indices`` holds then), for tensors
without a version counter (inference tensors), and for tensors that are not plain ``torch.Tensor``s.
Nor is anything kept that is built during a warm-up run of torch.compile's CUDA graphs (mode
"reduce-overhead"): those runs allocate in the graphs' private memory pool, which the graphs free and
poison when they move on, so a kept entry could later be read after its memory was reused.
One exception under capture: a builder registered with ``reuse_under_capture`` (the column check, which
produces nothing the kernels read) is skipped when the same state was already checked before the
capture, so a decode graph does not replay three checking launches per layer. A topology written in
place between replays is then not re-checked; the kernels still read nothing outside their operands.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

import torch
from torch.utils.weak import WeakIdKeyDictionary

# keyed by identity (a WeakKeyDictionary would compare tensors with ==, elementwise)
_entries = WeakIdKeyDictionary()
_lock = threading.Lock()
builds = 0  # how many times a builder ran through this cache (tests read it)


def _state(col_indices: torch.Tensor) -> tuple | None:
    """What must not change for an entry to stay valid, or None where nothing may be cached."""
    if type(col_indices) is not torch.Tensor or col_indices.is_inference():
        return None
    return col_indices._version, col_indices.data_ptr(), tuple(col_indices.shape), col_indices.dtype


def _capturing(col_indices: torch.Tensor) -> bool:
    return col_indices.is_cuda and torch.cuda.is_current_stream_capturing()


def _cudagraph_warmup(col_indices: torch.Tensor) -> bool:
    """Whether torch.compile's CUDA-graph trees are warming up on this thread and device (their private
    pool takes the allocations). Asked only when an entry would be kept. Where the trees' internals are
    not what this expects, the answer is yes: nothing is kept, which is slower but never wrong."""
    trees = sys.modules.get("torch._inductor.cudagraph_trees")
    if trees is None or not col_indices.is_cuda:
        return False
    try:
        index = col_indices.device.index if col_indices.device.index is not None else torch.cuda.current_device()
        manager = trees.get_manager(index, create_if_none_exists=False)
        return manager is not None and manager.path_state.name == "WARMUP"
    except Exception:  # noqa: BLE001  (a private API: any change of it must fail safe)
        return True


def may_keep(tensor: torch.Tensor) -> bool:
    """Whether memory allocated now on ``tensor``'s device may be kept past this call: not under CUDA graph
    capture, nor while torch.compile's CUDA-graph trees warm up (both allocate from a private pool that
    is freed or reused when the graphs move on)."""
    return not _capturing(tensor) and not _cudagraph_warmup(tensor)


def cached(col_indices: torch.Tensor, kind: str, num_cols: int, build: Callable[[], object],
           reuse_under_capture: bool = False):
    """``build()``'s result for this topology, reused while ``col_indices`` is unchanged (see the module
    docstring); ``kind`` and ``num_cols`` name what is built."""
    global builds
    state = _state(col_indices)
    if state is None:
        return build()
    key = (kind, num_cols)
    with _lock:
        per_tensor = _entries.get(col_indices)
        hit = per_tensor.get(key) if per_tensor is not None else None
    capturing = _capturing(col_indices)
    if hit is not None and hit[0] == state and (reuse_under_capture or not capturing):
        return hit[1]
    value = build()
    if not may_keep(col_indices):
        return value
    with _lock:
        builds += 1
        _entries.setdefault(col_indices, {})[key] = (state, value)
    return value


def per_topology(kind: str, build: Callable, reuse_under_capture: bool = False):
    """``build(col, num_cols)`` (a metadata builder: column view, slot table, column check) cached per
    state of ``col``: what the dispatcher's launchers call."""

    def cached_build(col: torch.Tensor, num_cols: int):
        return cached(col, kind, num_cols, lambda: build(col, num_cols), reuse_under_capture)

    return cached_build


def clear() -> None:
    """Forget every entry (tests)."""
    with _lock:
        _entries.clear()
