"""The gather forward: y = x W^T + bias with W stored as values [R, K, B, B] and col_indices [R, K].

A program owns an output tile [BM tokens x B] of one block-row r and walks the row's slots along the
flattened reduction dimension p = k*B + j, KSB positions a step: KSB >= B gathers KSB/B slots'
activation boxes side by side (a 64..128-deep ``tl.dot`` even for 16x16 blocks), KSB < B walks a
block in parts (smaller stages, deeper pipelines). Programs run in a grouped order (GROUP_M token
tiles visit all block-rows) so an activation panel stays in L2. For decode-sized inputs the slots are
split over SPLIT programs writing float32 partials, which ``common.reduce_partials`` sums in a fixed
order (+ bias, cast) in a second launch, or (FUSED) the last program of each output tile to finish sums
in the same order (``common.sum_split_if_last``). A slot whose column is outside [0, C) reads nothing and
adds nothing.

Which forward runs (this one, ``forward_tma``, ``tiles``) and with which SPLIT: ``dispatch.py``.
Autotuned per (token-count bucket, shape, K, B, SPLIT), never on col_indices values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, gather_configs, grouped_tile, interpreter_upcast, m_bucket, mma, prune_gather,
    sum_split_if_last,
)
from sparsify.kernels.launch import launch_tile

# Autotune configs as data: (BM tokens, KSB reduction depth per step, num_warps, num_stages).
# KSB >= B gathers KSB/B whole slots per step; KSB < B walks a block in KSB-wide parts (more stages fit).
# The pruner keeps those that fit the block size and the token count (common.gather_fits).
FORWARD_CONFIGS = [
    # large M
    (128, 64, 4, 4),
    (128, 64, 4, 5),
    (128, 64, 8, 6),
    (256, 64, 8, 5),
    (256, 128, 8, 3),
    (128, 128, 4, 4),
    (64, 128, 4, 4),
    # small M (decode)
    (16, 128, 4, 4),
    (16, 256, 4, 3),
    (32, 128, 4, 4),
    (16, 64, 4, 6),
]
# Deeper decode steps (16 x 256 and 16 x 512 tiles, 5-6 stages, 8 warps) were timed in CUDA graphs on an
# H200 and lost everywhere (benchmarks/NOTES.md, sixth session): not in the table.


# one stage: the activation tile [BM, KSB] and the block tile [KSB, B]
_prune_configs = prune_gather("KSB", lambda c, block, elem: (c.kwargs["BM"] + block) * c.kwargs["KSB"] * elem)


@triton.autotune(
    configs=gather_configs(FORWARD_CONFIGS, "KSB"),
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_configs},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _forward_kernel(
    x_ptr,  # [M, IN_F]
    v_ptr,  # [R, K, B, B]
    col_ptr,  # [R, K] int32
    bias_ptr,  # [N_OUT] or dummy
    y_ptr,  # [M, N_OUT] (x dtype) or [SPLIT, M, N_OUT] float32 partials
    out_ptr,  # FUSED: y [M, N_OUT] (x dtype), else unused
    count_ptr,  # FUSED: int32 arrival counters, one an output tile, zero; else unused
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    SPLIT,
    ELEM_BYTES,
    B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PARTIAL: tl.constexpr,
    FUSED: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    KSB: tl.constexpr,
    X_BOXES: tl.constexpr,
):
    RUN: tl.constexpr = B if KSB >= B else KSB  # contiguous activation elements per gathered run
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, r = grouped_tile(pid, tl.cdiv(M, BM), R)  # token tile, block-row

    # this program's slots [k_lo, k_hi) as positions p = k*B + j of the row's reduction dimension
    per_split = tl.cdiv(K, SPLIT)
    k_lo = pid_s * per_split
    k_hi = tl.minimum(k_lo + per_split, K)

    tokens = pid_m * BM + tl.arange(0, BM)
    token_ok = tokens < M
    jj = tl.arange(0, KSB)  # position inside one step: KSB/B whole slots, or a KSB-wide part of one
    outs = tl.arange(0, B)
    if X_BOXES:  # x laid out as [C, M, B] boxes: one slot's [tokens x B] activations are M*B contiguous elements
        x_tokens = x_ptr + (tokens * B).to(tl.int64)[:, None]
    else:
        x_tokens = x_ptr + tokens.to(tl.int64)[:, None] * IN_F
    v_row = v_ptr + r.to(tl.int64) * K * B * B
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in range(k_lo * B, k_hi * B, KSB):
        p = p0 + jj
        k = p // B
        j = p % B
        k_ok = k < k_hi
        col = tl.load(col_ptr + r * K + k, mask=k_ok, other=0)
        col_ok = k_ok & (col >= 0) & (col < IN_F // B)  # a column outside [0, C) reads nothing
        if X_BOXES:
            xcol = tl.max_contiguous(tl.multiple_of(col.to(tl.int64) * M * B + j, RUN), RUN)
        else:
            xcol = tl.max_contiguous(tl.multiple_of(col * B + j, RUN), RUN)
        xt = tl.load(x_tokens + xcol[None, :], mask=token_ok[:, None] & col_ok[None, :], other=0.0)  # [BM, KSB]
        # W^T tile [KSB, B]: element (jj, i) = values[r, k, i, j]
        # through L2 only (.cg, as the pipelined copies are anyway): in an unpipelined loop (num_stages 1, a decode
        # tile under test) the streamed weights then leave L1 to the activation rows the SM's programs re-read
        wt = tl.load(v_row + (k.to(tl.int64) * B * B + j)[:, None] + (outs * B)[None, :], mask=k_ok[:, None], other=0.0,
                     cache_modifier=".cg")
        acc = mma(xt, wt, acc, PRECISION, UPCAST)

    cols_out = r * B + outs
    if PARTIAL:
        out_ptrs = y_ptr + (pid_s * M + tokens.to(tl.int64))[:, None] * N_OUT + cols_out[None, :]
        tl.store(out_ptrs, acc, mask=token_ok[:, None])
        if FUSED:
            sum_split_if_last(y_ptr, count_ptr + pid, bias_ptr, out_ptr, tokens, token_ok, cols_out, M, N_OUT, SPLIT,
                              HAS_BIAS, BM, B)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_out).to(tl.float32)[None, :]
        out_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * N_OUT + cols_out[None, :]
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None])


def forward_gather(
    x: torch.Tensor,
    values: torch.Tensor,
    col: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
    fused_out: torch.Tensor | None = None,
    counters: torch.Tensor | None = None,
) -> None:
    """The gather kernel on x [M, in], values, col [R, K] int32. ``out``: y [M, out] in x's dtype (bias
    added), or float32 partials [SPLIT, M, out] of SPLIT slot ranges, summed (+ bias) by a later
    reduce_partials, or, given ``fused_out`` (y) and ``counters`` (split_counters.split_counters, at least
    cdiv(M, 16) * R), by the kernel itself into ``fused_out``.
    ``config``: a fixed tile {"BM", "KSB", "num_warps", "num_stages"} instead of autotuning, and / or
    "X_BOXES": True, x first copied into [C, M, B] boxes (a decode design under test, benchmarks/decode_split.py:
    each slot's activations then come as whole 128-byte lines, not one 32-byte piece a token at B = 16)."""
    block_rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    tile = dict(config or {})
    boxes = tile.pop("X_BOXES", False)
    if boxes:
        x = x.view(num_tokens, in_features // block, block).transpose(0, 1).contiguous()
    out_features = block_rows * block
    split = out.shape[0] if out.dim() == 3 else 1
    fused = split > 1 and fused_out is not None
    has_bias = bias is not None and (split == 1 or fused)
    args = (
        x, values, col, bias if has_bias else out, out, fused_out if fused else out, counters if fused else col,
        num_tokens, m_bucket(num_tokens), out_features, in_features, k, block_rows, split, x.element_size(),
    )
    flags = dict(B=block, HAS_BIAS=has_bias, PARTIAL=split > 1, FUSED=fused, PRECISION=dot_precision(x.dtype),
                 UPCAST=interpreter_upcast(x.dtype), X_BOXES=boxes)
    grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * block_rows, split)  # noqa: E731
    launch_tile(_forward_kernel, grid, args, flags, x.device, tile or None)
