"""The dense-weight path's GEMMs (sparsify/kernels/dense_weight.py, on a given W) against float64 on fresh random
operands, NaN-poisoned outputs, bitwise repeats, and where the launchers take the path. W and the blocks of the
gradient (tiles.densify / tiles.blocks_of, Triton kernels) and the routed launchers with bad columns are checked
in the interpreter (triton_interpreter_checks.py) and on the GPU (tests/gpu/test_gpu_dense_weight.py)."""

from __future__ import annotations

import pytest
import torch

from sparsify import kernel_options
from sparsify.block_ell import to_dense
from sparsify.kernels import dispatch
from sparsify.kernels.dense_weight import forward_dense, grad_input_dense


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def operands(dtype, block=8, rows=5, cols=6, k=3, tokens=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    col = torch.stack([torch.randperm(cols, generator=gen)[:k] for _ in range(rows)]).to(torch.int32)
    col[1, 2] = cols + 3  # outside [0, C): reads and adds nothing
    col[3, 2] = -1
    col[4, 1] = col[4, 0]  # a repeated column: both slots get its gradient
    values = torch.randn(rows, k, block, block, generator=gen).to(dtype)
    x = torch.randn(tokens, cols * block, generator=gen).to(dtype)
    grad_out = torch.randn(tokens, rows * block, generator=gen).to(dtype)
    bias = torch.randn(rows * block, generator=gen).to(dtype)
    return values, col, x, grad_out, bias


def reference_weight(values, col, in_features):
    valid = (col >= 0) & (col < in_features // values.shape[2])
    kept = torch.where(valid[:, :, None, None], values.double(), 0)
    return to_dense(kept, torch.where(valid, col, 0), in_features), valid


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2), (torch.float64, 1e-12)])
def test_the_forward_and_grad_input_match_float64_into_poisoned_outputs(dtype, tol):
    values, col, x, grad_out, bias = operands(dtype)
    weight, _ = reference_weight(values, col, x.shape[1])
    w = weight.to(dtype)
    y = forward_dense(x, w, bias, poisoned(x.shape[0], weight.shape[0], dtype=dtype))
    assert rel(y, x.double() @ weight.T + bias.double()) < tol
    assert rel(forward_dense(x, w, None, torch.empty_like(y)), x.double() @ weight.T) < tol
    gx = grad_input_dense(grad_out, w, poisoned(*x.shape, dtype=dtype))
    assert rel(gx, grad_out.double() @ weight) < tol


def test_the_products_repeat_bitwise():
    values, col, x, grad_out, bias = operands(torch.bfloat16, seed=3)
    w = reference_weight(values, col, x.shape[1])[0].to(torch.bfloat16)
    runs = [(forward_dense(x, w, bias, torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)),
             grad_input_dense(grad_out, w, torch.empty_like(x))) for _ in range(2)]
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_the_launchers_take_it_where_the_option_or_the_thresholds_say():
    assert dispatch.use_dense_weight(16, 0.5, 8192) and dispatch.use_dense_weight(32, 0.5, 8192, "backward")
    assert not dispatch.use_dense_weight(32, 0.25, 8192)  # the per-block kernels do half the work there
    assert not dispatch.use_dense_weight(64, 0.5, 8192) and not dispatch.use_dense_weight(16, 0.5, 1024)
    with kernel_options(block_kernel="dense"):
        assert dispatch.use_dense_weight(128, 0.1, 16)
        assert not dispatch.use_tiles(16, 0.5, 8192)
    with kernel_options(block_kernel="tile"):
        assert not dispatch.use_dense_weight(16, 0.5, 8192)
