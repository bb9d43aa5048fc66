"""grad_values: dL/dvalues[r, k] = grad_out[:, r]^T x[:, col_indices[r, k]] summed over tokens, in a
fixed order (bitwise reproducible).

Gather kernel: one program owns block-row r and GS consecutive slots: it walks the tokens BM at a time
in order, multiplying the GS gathered, transposed activation boxes [GS*B, BM] with the grad_out box
[BM, B]. A slot whose column is outside [0, C) reads nothing: its gradient is zero.

Tile kernel (small blocks, many tokens): dense [BO, BI] tiles of grad_out^T x in token order, of which
only the blocks in the slot table (``tiles.slot_table``) are stored.

When there are too few programs to fill the GPU (few block-rows, many tokens) either kernel splits
the tokens into SPLIT fixed ranges (``common.token_range``) and writes float32 partials, which
``common.reduce_partials`` adds in a fixed order. Which kernel, which SPLIT: ``dispatch.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, gather_configs, interpreter_upcast, m_bucket, mma, prune_gather, prune_tiles,
    token_range,
)
from sparsify.kernels.launch import launch_tile
from sparsify.kernels.tiles import TILE_CONFIGS

# (BM tokens, GSB: gathered positions GS*B (or a part of one block), num_warps, num_stages)
GRAD_VALUES_CONFIGS = [
    # 8 slots share each grad_out box (B >= 64): 1.125 box loads a block a step instead of 1.25 with 4; the
    # B = 64 grad_values is L2-bound (benchmarks/NOTES.md), so fewer loads per multiply-add is the lever
    (64, 512, 8, 3),
    (64, 256, 8, 3),
    (64, 128, 4, 4),
    (128, 128, 8, 3),
    (128, 64, 4, 5),
    (64, 128, 4, 5),
    (32, 128, 4, 3),
    (16, 128, 4, 3),
]

# one stage: the activation tile [GSB, BM] and the grad_out tile [BM, B]
_prune_grad_values = prune_gather("GSB", lambda c, block, elem: (c.kwargs["GSB"] + block) * c.kwargs["BM"] * elem)


@triton.autotune(
    configs=gather_configs(GRAD_VALUES_CONFIGS, "GSB"),
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_grad_values},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _grad_values_kernel(
    g_ptr,  # grad_out [M, N_OUT]
    x_ptr,  # x [M, IN_F]
    col_ptr,  # [R, K] int32
    dv_ptr,  # [R, K, B, B] (grad_out dtype) or [SPLIT, R, K, B, B] float32 partials
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    SPLIT,
    ELEM_BYTES,
    B: tl.constexpr,
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    GSB: tl.constexpr,
):
    RUN: tl.constexpr = B if GSB >= B else GSB
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # this program: positions p = k*B + j in [p0, p0 + GSB) of row r (GSB/B slots, or part of one)
    groups_per_row = tl.cdiv(K * B, GSB)
    r = pid // groups_per_row
    p = (pid % groups_per_row) * GSB + tl.arange(0, GSB)
    k = p // B
    k_ok = k < K
    j = p % B
    col = tl.load(col_ptr + r * K + k, mask=k_ok, other=0)
    col_ok = k_ok & (col >= 0) & (col < IN_F // B)  # a column outside [0, C) reads nothing
    xcol = tl.max_contiguous(tl.multiple_of(col * B + j, RUN), RUN)
    outs = tl.arange(0, B)

    m_lo, m_hi = token_range(pid_s, M, BM, SPLIT)
    # acc[p - p0, i] = dvalues[r, k, i, j]: the gathered side is the tall operand (tensor-core M)
    acc = tl.zeros((GSB, B), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        tokens = m0 + tl.arange(0, BM)
        token_ok = tokens < m_hi
        xt = tl.load(x_ptr + tokens.to(tl.int64)[None, :] * IN_F + xcol[:, None], mask=token_ok[None, :] & col_ok[:, None], other=0.0)  # [GS*B, BM]
        gt = tl.load(g_ptr + tokens.to(tl.int64)[:, None] * N_OUT + (r * B + outs)[None, :], mask=token_ok[:, None], other=0.0)  # [BM, B]
        acc = mma(xt, gt, acc, PRECISION, UPCAST)
    offs = (r * K + k).to(tl.int64)[:, None] * B * B + outs[None, :] * B + j[:, None]
    if PARTIAL:
        tl.store(dv_ptr + pid_s.to(tl.int64) * R * K * B * B + offs, acc, mask=k_ok[:, None])
    else:
        tl.store(dv_ptr + offs, acc.to(dv_ptr.dtype.element_ty), mask=k_ok[:, None])


@triton.autotune(
    configs=[
        triton.Config({"BO": bn, "BI": bm, "BT": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in TILE_CONFIGS
    ],
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "SPLIT"],
    prune_configs_by={"early_config_prune": prune_tiles("BO", "BT", "BI", "BO", "BI")},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _tile_grad_values_kernel(
    g_ptr,  # grad_out [M, N_OUT]
    x_ptr,  # x [M, IN_F]
    slot_ptr,  # [R, C] int32 slot of block (r, c) or -1
    dv_ptr,  # [R, K, B, B] or [SPLIT, R, K, B, B] float32 partials
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    C,
    SPLIT,
    B: tl.constexpr,
    PARTIAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BO: tl.constexpr,
    BI: tl.constexpr,
    BT: tl.constexpr,
):
    """Small blocks: a dense [BO, BI] tile of grad_out^T x, summed over the tokens in order, of which
    only the blocks the topology keeps are stored (into their slots)."""
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    num_i = tl.cdiv(IN_F, BI)
    pid_o = pid // num_i
    pid_i = pid % num_i
    outs = pid_o * BO + tl.arange(0, BO)
    ins = pid_i * BI + tl.arange(0, BI)
    o_ok = outs < N_OUT
    i_ok = ins < IN_F
    m_lo, m_hi = token_range(pid_s, M, BT, SPLIT)
    acc = tl.zeros((BO, BI), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BT):
        toks = m0 + tl.arange(0, BT)
        t_ok = toks < m_hi
        gt = tl.load(g_ptr + toks.to(tl.int64)[None, :] * N_OUT + outs[:, None], mask=o_ok[:, None] & t_ok[None, :], other=0.0)  # [BO, BT]
        xt = tl.load(x_ptr + toks.to(tl.int64)[:, None] * IN_F + ins[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)  # [BT, BI]
        acc = mma(gt, xt, acc, PRECISION, UPCAST)
    r = outs // B
    c = ins // B
    slot = tl.load(slot_ptr + r[:, None] * C + c[None, :], mask=o_ok[:, None] & i_ok[None, :], other=-1)
    offs = ((r[:, None] * K + slot).to(tl.int64) * B + (outs % B)[:, None]) * B + (ins % B)[None, :]
    kept = slot >= 0
    if PARTIAL:
        tl.store(dv_ptr + pid_s.to(tl.int64) * R * K * B * B + offs, acc, mask=kept)
    else:
        tl.store(dv_ptr + offs, acc.to(dv_ptr.dtype.element_ty), mask=kept)


def _target_split(target: torch.Tensor) -> int:
    """SPLIT of a grad_values target: [R, K, B, B] (1) or float32 partials [SPLIT, R, K, B, B]."""
    return target.shape[0] if target.dim() == 5 else 1


def grad_values_gather(grad_out, x, col, target, config: dict | None = None) -> None:
    """The gather kernel: target [R, K, B, B] (grad_out's dtype) or float32 partials [SPLIT, R, K, B, B]
    of SPLIT token ranges. ``config``: a fixed tile {"BM", "GSB", "num_warps", "num_stages"}."""
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    block_rows, k = col.shape
    block = target.shape[-1]
    split = _target_split(target)
    args = (
        grad_out, x, col, target,
        num_tokens, m_bucket(num_tokens), out_features, in_features, k, block_rows, split, grad_out.element_size(),
    )
    flags = dict(B=block, PARTIAL=split > 1, PRECISION=dot_precision(grad_out.dtype),
                 UPCAST=interpreter_upcast(grad_out.dtype))
    grid = lambda meta: (block_rows * cdiv(k * block, meta["GSB"]), split)  # noqa: E731
    launch_tile(_grad_values_kernel, grid, args, flags, x.device, config)


def grad_values_tiles(grad_out, x, table, target, config: dict | None = None) -> None:
    """The tile kernel with the topology as a slot table [R, C] (``tiles.slot_table``); target as in
    ``grad_values_gather``. ``config``: a fixed tile {"BO", "BI", "BT", "num_warps", "num_stages"}."""
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    block_rows, k, block = target.shape[-4], target.shape[-3], target.shape[-1]
    split = _target_split(target)
    args = (
        grad_out, x, table, target,
        num_tokens, m_bucket(num_tokens), out_features, in_features, k, block_rows, table.shape[1], split,
    )
    flags = dict(B=block, PARTIAL=split > 1, PRECISION=dot_precision(x.dtype), UPCAST=interpreter_upcast(x.dtype))
    grid = lambda meta: (cdiv(out_features, meta["BO"]) * cdiv(in_features, meta["BI"]), split)  # noqa: E731
    launch_tile(_tile_grad_values_kernel, grid, args, flags, x.device, config)
