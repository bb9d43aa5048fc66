"""A sparse layer compiled with mode="reduce-overhead" (torch.compile's CUDA-graph trees) from its very
first call, with no eager call before: outputs and gradients equal the eager layer's, after warm-up,
recording and replays, after its topology is rewritten in place between replays, and in an eager call
afterwards (which would read a topology-cache entry kept from the warm-up, whose memory the graphs'
private pool frees and poisons, if one were kept). Skipped without CUDA."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify import BlockSparseLinear
from sparsify.kernels import topology_cache

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")


def _step(layer, x, grad):
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    y = layer(x)
    y.backward(grad)
    return y.detach().clone(), x.grad.clone(), layer.values.grad.clone()


def test_reduce_overhead_from_the_first_call_matches_eager_through_topology_rewrites():
    torch.manual_seed(0)
    topology_cache.clear()
    layer = BlockSparseLinear(512, 1024, block_size=64, density=0.5, device="cuda", dtype=torch.bfloat16)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, mode="reduce-overhead")
    x = torch.randn(256, 512, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16)

    def compare():
        for _ in range(3):  # warm-up, recording, replay (or replays)
            torch.compiler.cudagraph_mark_step_begin()
            got = _step(compiled, x, grad)
        want = _step(reference, x, grad)
        for a, b in zip(got, want):
            assert torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2), (a - b).abs().max()

    compare()
    new = torch.roll(layer.col_indices, shifts=1, dims=1)
    with torch.no_grad():
        layer.col_indices.copy_(new)
        reference.col_indices.copy_(new)
    compare()
    eager = _step(layer, x, grad)  # the layer itself, eagerly: reads the cache if anything was kept
    want = _step(reference, x, grad)
    for a, b in zip(eager, want):
        assert torch.equal(a, b)
