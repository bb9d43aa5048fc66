"""grad_input: dL/dx = grad_out W, walking the topology column by column, without atomics.

Block-column c of dL/dx gathers from every slot (r, k) whose col_indices[r, k] == c. The column view
(``column_view.py``, built on the device each call in one launch, no host sync, always in sync with the
topology) lists the flat slots r*K + k column by column: `slots_by_col[col_start[c] : col_start[c+1]]`
is column c's stretch. One program owns an output tile [BM tokens x B] of one column and walks its
stretch TS entries at a time: the grad_out boxes of those entries' block-rows are gathered into one
[BM, TS*B] tile and multiplied with their blocks ([TS*B, B], each block read as stored). Every output
element is written by exactly one program in one fixed order, so the result is bitwise reproducible;
columns no slot uses are written as zeros. A slot whose column is outside [0, C) is in no stretch.

Small blocks with many tokens take the masked-dense tiles instead (``tiles.tile_matmul`` on W); which
one runs: ``dispatch.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, gather_configs, grouped_tile, interpreter_upcast, m_bucket, mma, prune_gather,
)
from sparsify.kernels.launch import launch_tile

# (BM tokens, TSB: positions of the column's stretch a step, num_warps, num_stages)
GRAD_INPUT_CONFIGS = [
    (128, 64, 4, 4),
    (128, 64, 4, 5),
    (128, 64, 8, 6),
    (256, 64, 8, 5),
    (64, 128, 4, 4),
    (128, 128, 4, 4),
    (16, 128, 4, 4),
    (32, 128, 4, 3),
]

# one stage: the grad_out tile [BM, TSB] and the block tile [TSB, B]
_prune_grad_input = prune_gather("TSB", lambda c, block, elem: (c.kwargs["BM"] + block) * c.kwargs["TSB"] * elem)


@triton.autotune(
    configs=gather_configs(GRAD_INPUT_CONFIGS, "TSB"),
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B"],
    prune_configs_by={"early_config_prune": _prune_grad_input},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _grad_input_kernel(
    g_ptr,  # grad_out [M, N_OUT]
    v_ptr,  # values [R, K, B, B]
    slots_ptr,  # [R*K] int32: flat slots r*K + k sorted by column (stable)
    start_ptr,  # [C + 1] int32: column c's stretch of slots_ptr
    gx_ptr,  # [M, IN_F]
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    C,
    ELEM_BYTES,
    B: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    TSB: tl.constexpr,
):
    RUN: tl.constexpr = B if TSB >= B else TSB
    pid = tl.program_id(0)
    pid_m, c = grouped_tile(pid, tl.cdiv(M, BM), C)  # token tile, block-column

    lo = tl.load(start_ptr + c)
    hi = tl.load(start_ptr + c + 1)
    tokens = pid_m * BM + tl.arange(0, BM)
    token_ok = tokens < M
    tt = tl.arange(0, TSB)  # TSB/B whole entries per step, or a TSB-wide part of one
    js = tl.arange(0, B)
    g_tokens = g_ptr + tokens.to(tl.int64)[:, None] * N_OUT
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in range(lo * B, hi * B, TSB):  # positions p = t*B + i along the column's stretch
        p = p0 + tt
        t = p // B
        i = p % B
        t_ok = t < hi
        slot = tl.load(slots_ptr + t, mask=t_ok, other=0)
        r = slot // K
        gcol = tl.max_contiguous(tl.multiple_of(r * B + i, RUN), RUN)
        gt = tl.load(g_tokens + gcol[None, :], mask=token_ok[:, None] & t_ok[None, :], other=0.0)  # [BM, TSB]
        # block tile [TSB, B]: element (tt, j) = values[slot, i, j], rows read as stored
        vt = tl.load(v_ptr + (slot.to(tl.int64) * B * B + i * B)[:, None] + js[None, :], mask=t_ok[:, None], other=0.0)
        acc = mma(gt, vt, acc, PRECISION, UPCAST)
    out = gx_ptr + tokens.to(tl.int64)[:, None] * IN_F + (c * B + js)[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=token_ok[:, None])


def grad_input_columns(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    slots_by_col: torch.Tensor,
    col_start: torch.Tensor,
    grad_x: torch.Tensor,
    config: dict | None = None,
) -> None:
    """grad_x [M, in] = grad_out [M, out] W through the column view (``column_view.column_view``).
    ``config``: a fixed tile {"BM", "TSB", "num_warps", "num_stages"} instead of autotuning."""
    _, k, block, _ = values.shape
    num_tokens, out_features = grad_out.shape
    in_features = grad_x.shape[1]
    num_cols = in_features // block
    args = (
        grad_out, values, slots_by_col, col_start, grad_x,
        num_tokens, m_bucket(num_tokens), out_features, in_features, k, num_cols, grad_out.element_size(),
    )
    flags = dict(B=block, PRECISION=dot_precision(grad_out.dtype), UPCAST=interpreter_upcast(grad_out.dtype))
    grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * num_cols,)  # noqa: E731
    launch_tile(_grad_input_kernel, grid, args, flags, grad_out.device, config)
