"""The arrival counters of the fused split reduction: zeroed, kept and reused per device and stream, grown
when a call needs more, and never kept where the memory comes from a CUDA graph's pool."""

from __future__ import annotations

import torch

from sparsify.kernels import split_counters as counters


def test_counters_are_zeroed_kept_reused_and_grown():
    counters.clear()
    like = torch.zeros(3)
    first = counters.split_counters(like, 10)
    assert first.dtype == torch.int32 and first.numel() == 10 and not first.any()
    assert counters.split_counters(like, 4) is first  # a smaller need reuses the kept buffer
    bigger = counters.split_counters(like, 11)
    assert bigger.numel() == 11 and not bigger.any() and counters.split_counters(like, 11) is bigger
    counters.clear()


def test_memory_of_a_graph_pool_is_never_kept(monkeypatch):
    counters.clear()
    monkeypatch.setattr(counters, "may_keep", lambda tensor: False)  # as under capture or a cudagraph warm-up
    like = torch.zeros(3)
    first, second = counters.split_counters(like, 5), counters.split_counters(like, 5)
    assert first is not second and not first.any() and not second.any()
    assert not counters._buffers
