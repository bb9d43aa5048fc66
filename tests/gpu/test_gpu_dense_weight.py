"""CUDA correctness of the dense-weight path (sparsify/kernels/dense_weight.py: W materialised for the call,
cuBLAS for the GEMMs) through the layer, against float64; skipped without a GPU.

    python -m pytest tests/gpu/test_gpu_dense_weight.py -q      # on the GPU machine

Forced (kernel option block_kernel="dense") at every block size and routed by the default thresholds
(B = 16 / 32, 4096 tokens); bf16, fp16 and fp32; the forward and both gradients, each run twice and
compared bitwise; an in-place topology change between the runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sparsify import BlockSparseLinear, kernel_options

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block, option", [(16, "auto"), (32, "auto"), (16, "dense"), (64, "dense"), (128, "dense")])
def test_the_layer_through_the_dense_weight_matches_float64_and_repeats_bitwise(block, option, dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(block)
    layer = BlockSparseLinear(512, 1024, block_size=block, density=0.5, bias=True, device="cuda", dtype=dtype)
    tokens = 4096  # above DENSE_MIN_TOKENS: auto takes the dense weight at B = 16 and 32
    grad = torch.randn(tokens, 1024, device="cuda", dtype=dtype)
    x = torch.randn(tokens, 512, device="cuda", dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1.5e-2
    for step in range(2):
        if step:  # a new topology, written in place as the topology optimizer does
            with torch.no_grad():
                layer.col_indices.copy_(torch.roll(layer.col_indices, shifts=1, dims=1))
        runs = []
        for _ in range(2):
            xg = x.clone().requires_grad_()
            layer.zero_grad()
            with kernel_options(block_kernel=option):
                y = layer(xg)
                y.backward(grad)
            runs.append((y.detach(), xg.grad, layer.values.grad.clone()))
        for first, second in zip(*runs):
            assert torch.equal(first, second)
        y, gx, gv = runs[0]
        dense = layer.to_dense().double()
        assert rel(y, F.linear(x.double(), dense, layer.bias.double())) < tol
        assert rel(gx, grad.double() @ dense) < tol
        full = (grad.double().T @ x.double()).view(1024 // block, block, 512 // block, block)
        rows = torch.arange(layer.col_indices.shape[0], device="cuda")[:, None].expand_as(layer.col_indices)
        assert rel(gv, full[rows, :, layer.col_indices.long(), :]) < tol
