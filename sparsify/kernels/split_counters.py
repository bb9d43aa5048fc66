"""Arrival counters of the fused split reduction (kernel option split_reduce="fused"): one int32 an output
tile, counting the programs of the tile that have stored their float32 partial. The last to arrive sums
the partials and sets the counter back to zero, so a buffer is zero between calls and is kept, one per
device and stream (two streams never count into one buffer; calls on one stream run in order).

Memory that torch.compile's CUDA-graph trees warm up with, or that a CUDA graph captures, is not kept
(``topology_cache.may_keep``): it comes from a private pool the graphs free or reuse. A call there takes
a fresh zeroed buffer instead; under capture, the zeroing is replayed with the graph.
"""

from __future__ import annotations

import threading

import torch

from sparsify.kernels.topology_cache import may_keep

_buffers: dict[tuple, torch.Tensor] = {}
_lock = threading.Lock()


def split_counters(like: torch.Tensor, count: int) -> torch.Tensor:
    """At least ``count`` zeroed int32 counters on ``like``'s device, for the current stream."""
    stream = torch.cuda.current_stream(like.device).stream_id if like.is_cuda else 0
    key = (like.device.type, like.device.index, stream)
    with _lock:
        kept = _buffers.get(key)
    if kept is not None and kept.numel() >= count:
        return kept
    fresh = torch.zeros(count, dtype=torch.int32, device=like.device)
    if may_keep(like):
        with _lock:
            _buffers[key] = fresh
    return fresh


def clear() -> None:
    """Forget the kept buffers (tests)."""
    with _lock:
        _buffers.clear()
