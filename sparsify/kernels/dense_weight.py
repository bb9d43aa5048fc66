"""The three products through the dense weight, materialised for the call, with cuBLAS doing the GEMMs:
the path for small blocks at many tokens and densities where no per-block kernel beats dense.

Why: at B <= 32 the per-block kernels fetch an activation box for every block they multiply, so they are
bound by L2 requests (the grouped kernel at B = 16: 96% of the L2 peak with the tensor pipe 10% busy,
benchmarks/NOTES.md), and the masked-dense tile kernel (tiles.py) does the dense FLOPs at about half of
cuBLAS's rate. Writing W once ([out, in], zeros outside the kept blocks) and calling cuBLAS does the same
dense FLOPs at cuBLAS's rate, for one dense-size buffer that lives only during the call (dense_weight for
the forward and grad_input, the dense gradient for grad_values).

Exact and deterministic: fp32 accumulation in cuBLAS, tf32 only where torch allows it; no atomics (each
element of W is written by one slot, a zero plus one value, unless a row repeats a column: then the slots
are summed, as ``to_dense`` and the kernels do). A slot whose column is outside [0, C) goes to a sink
block-column past the last one: it reads and adds nothing, and its grad_values are zeros.
"""

from __future__ import annotations

import torch


def _slots(col_indices: torch.Tensor, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(block-row, block-column) of every slot, the column C (the sink) where it is outside [0, C)."""
    col = col_indices.long()
    rows = torch.arange(col.shape[0], device=col.device)[:, None].expand_as(col)
    return rows, torch.where((col >= 0) & (col < num_cols), col, num_cols)


def dense_weight(values: torch.Tensor, col_indices: torch.Tensor, in_features: int) -> torch.Tensor:
    """W [out, in] from the blocks: a view whose rows are in + B apart (the sink block-column past them),
    which cuBLAS reads as it is."""
    block_rows, _, block, _ = values.shape
    num_cols = in_features // block
    wide = values.new_zeros(block_rows, block, num_cols + 1, block)
    rows, cols = _slots(col_indices, num_cols)
    torch.ops.aten.index_put_(wide, [rows, None, cols, None], values, True)  # [r, :, c, :] += values[r, k]
    return wide.view(block_rows * block, (num_cols + 1) * block)[:, :in_features]


def forward_dense(x, values, col_indices, bias, out: torch.Tensor) -> torch.Tensor:
    """out [M, out] = x W^T + bias."""
    weight = dense_weight(values, col_indices, x.shape[1])
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


def grad_input_dense(grad_out, values, col_indices, out: torch.Tensor) -> torch.Tensor:
    """out [M, in] = grad_out W."""
    return torch.mm(grad_out, dense_weight(values, col_indices, out.shape[1]), out=out)


def grad_values_dense(grad_out, x, col_indices, block: int, out: torch.Tensor) -> torch.Tensor:
    """out [R, K, B, B] = the blocks of grad_out^T x at the slots' places (zeros for a slot outside [0, C))."""
    block_rows = col_indices.shape[0]
    num_cols = x.shape[1] // block
    wide = torch.empty(block_rows * block, (num_cols + 1) * block, dtype=out.dtype, device=out.device)
    wide[:, x.shape[1]:].zero_()  # the sink
    torch.mm(grad_out.t(), x, out=wide[:, : x.shape[1]])
    rows, cols = _slots(col_indices, num_cols)
    return out.copy_(wide.view(block_rows, block, num_cols + 1, block)[rows, :, cols, :])
