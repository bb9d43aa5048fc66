"""The dense-weight path's products (sparsify/kernels/dense_weight.py: the GEMMs in torch / cuBLAS on W) against
float64 on fresh random operands: grad_values' zeros for a column outside [0, C), a repeated column, NaN-poisoned
outputs, bitwise repeats, and where the launchers take the path. W itself (tiles.densify, a Triton kernel) and the
routed launchers are checked in the interpreter (triton_interpreter_checks.py) and on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from sparsify import kernel_options
from sparsify.block_ell import to_dense
from sparsify.kernels import dispatch
from sparsify.kernels.dense_weight import forward_dense, grad_input_dense, grad_values_dense


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
def test_the_three_products_match_float64_with_bad_and_repeated_columns(dtype, tol):
    values, col, x, grad_out, bias = operands(dtype)
    weight, valid = reference_weight(values, col, x.shape[1])
    w = weight.to(dtype)

    y = forward_dense(x, w, bias, poisoned(x.shape[0], weight.shape[0], dtype=dtype))
    assert rel(y, x.double() @ weight.T + bias.double()) < tol
    assert rel(forward_dense(x, w, None, torch.empty_like(y)), x.double() @ weight.T) < tol
    gx = grad_input_dense(grad_out, w, poisoned(*x.shape, dtype=dtype))
    assert rel(gx, grad_out.double() @ weight) < tol

    gv = grad_values_dense(grad_out, x, col, values.shape[2], poisoned(*values.shape, dtype=dtype))
    full = (grad_out.double().T @ x.double()).view(values.shape[0], values.shape[2], -1, values.shape[2])
    rows = torch.arange(col.shape[0])[:, None].expand_as(col)
    expected = torch.where(valid[:, :, None, None], full[rows, :, torch.where(valid, col, 0).long(), :], 0)
    assert rel(gv, expected) < tol
    assert torch.equal(gv[~valid], torch.zeros_like(gv[~valid]))  # exact zeros, not NaN, where nothing is read
    assert torch.equal(gv[4, 0], gv[4, 1])  # a repeated column: both slots get its gradient


def test_the_products_repeat_bitwise():
    values, col, x, grad_out, bias = operands(torch.bfloat16, seed=3)
    w = reference_weight(values, col, x.shape[1])[0].to(torch.bfloat16)
    runs = [(forward_dense(x, w, bias, torch.empty(x.shape[0], w.shape[0], dtype=x.dtype)),
             grad_input_dense(grad_out, w, torch.empty_like(x)),
             grad_values_dense(grad_out, x, col, 8, torch.empty_like(values))) for _ in range(2)]
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
