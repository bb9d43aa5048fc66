"""The topology column by column, for grad_input's walk: which slots (r, k) feed block-column c.

Built on the device each call in one launch, without a host sync (so it can be captured in a CUDA
graph) and always in sync with ``col_indices``, however the topology optimizer changed it. A slot
whose column is outside [0, C) is listed after every real column's stretch, so no column reads it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import cdiv
from sparsify.kernels.launch import launch


@triton.jit
def _column_view_kernel(col_ptr, slots_ptr, start_ptr, TOTAL, C, CB: tl.constexpr, CHUNK: tl.constexpr):
    """Columns [pid*CB, pid*CB + CB): col_start[c] = number of slots whose column is < c, then the
    slots of column c (flat r*K + k, increasing) written from there. Two reads of col_indices."""
    cols = tl.program_id(0) * CB + tl.arange(0, CB)
    before = tl.zeros((CB,), dtype=tl.int32)
    for s0 in range(0, TOTAL, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        v = tl.load(col_ptr + s, mask=s < TOTAL, other=C)  # padding: column C, after every real one
        v = tl.where((v >= 0) & (v < C), v, C)  # and so is a column outside [0, C)
        before += tl.sum((v[None, :] < cols[:, None]).to(tl.int32), axis=1)
    seen = tl.zeros((CB,), dtype=tl.int32)
    for s0 in range(0, TOTAL, CHUNK):
        s = s0 + tl.arange(0, CHUNK)
        v = tl.load(col_ptr + s, mask=s < TOTAL, other=C)
        v = tl.where((v >= 0) & (v < C), v, C)
        match = ((v[None, :] == cols[:, None]) & (s < TOTAL)[None, :]).to(tl.int32)  # [CB, CHUNK]
        position = before[:, None] + seen[:, None] + tl.cumsum(match, axis=1) - 1
        tl.store(slots_ptr + position, tl.broadcast_to(s[None, :], (CB, CHUNK)), mask=match > 0)
        seen += tl.sum(match, axis=1)
    tl.store(start_ptr + cols, before, mask=cols <= C)  # column C's start is TOTAL: the end of the last


COLUMN_VIEW_CB = 16
COLUMN_VIEW_CHUNK = 256


def column_view(col_indices: torch.Tensor, num_cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The topology column by column, built on the device in one launch without a host sync (so it can
    be captured in a CUDA graph): (slots_by_col [R*K], col_start [C+1]) int32, column c's slots are
    slots_by_col[col_start[c] : col_start[c+1]] in increasing slot order."""
    flat = col_indices.reshape(-1)
    flat = flat if flat.dtype == torch.int32 else flat.to(torch.int32)
    slots_by_col = torch.empty_like(flat)
    col_start = torch.empty(num_cols + 1, dtype=torch.int32, device=flat.device)
    grid = (cdiv(num_cols + 1, COLUMN_VIEW_CB),)
    launch(_column_view_kernel, grid, (flat, slots_by_col, col_start, flat.numel(), num_cols),
           dict(CB=COLUMN_VIEW_CB, CHUNK=COLUMN_VIEW_CHUNK), flat.device)
    return slots_by_col, col_start
