"""The three products through the dense weight, materialised for the call, with cuBLAS doing the GEMMs:
the path for small blocks at many tokens and densities where no per-block kernel beats dense.

Why: at B <= 32 the per-block kernels fetch an activation box for every block they multiply, so they are
bound by L2 requests (the grouped kernel at B = 16: 96% of the L2 peak with the tensor pipe 10% busy,
benchmarks/NOTES.md), and the masked-dense tile kernel (tiles.py) does the dense FLOPs at about half of
cuBLAS's rate. Writing W once ([out, in], zeros outside the kept blocks) and calling cuBLAS does the same
dense FLOPs at cuBLAS's rate, for one dense-size buffer that lives only during the call (the weight for
the forward and grad_input, the dense gradient for grad_values).

Exact and deterministic as nn.Linear is: cuBLAS accumulates in fp32 (its split-K partial sums in bf16 / fp16
only where torch.backends.cuda.matmul.allow_bf16/fp16_reduced_precision_reduction allow it, as for nn.Linear),
tf32 only where torch allows it, no atomics. W comes from
the blocks at their slots' columns (``tiles.densify``, which finds each block-column's slot among the row's
column indices, so no slot table is kept for this path): a slot whose column is outside [0, C) reads and adds
nothing, and of slots repeating a column in one row only the last is kept (every public way of setting a
topology rejects repeats). grad_values: the blocks of the dense gradient at the slots'
places (``tiles.blocks_of``), zeros for a slot outside [0, C).
"""

from __future__ import annotations

import torch


def forward_dense(x: torch.Tensor, weight: torch.Tensor, bias, out: torch.Tensor) -> torch.Tensor:
    """out [M, out] = x W^T + bias (W: the dense weight, ``tiles.densify``)."""
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def grad_input_dense(grad_out: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [M, in] = grad_out W."""
    return torch.mm(grad_out, weight, out=out)


def grad_values_dense(grad_out, x, col_indices, out: torch.Tensor, blocks_of) -> torch.Tensor:
    """out [R, K, B, B] = the blocks of grad_out^T x at the slots' places (``blocks_of``: ``tiles.blocks_of``,
    zeros for a slot outside [0, C))."""
    return blocks_of(torch.mm(grad_out.t(), x), col_indices, out)
