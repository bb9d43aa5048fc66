"""Triton Block-ELL forward: y = x W^T + bias with W stored as values [R, K, B, B] and col_indices [R, K].

Three kernels; the launcher here picks one (measured choices, see benchmarks/NOTES.md):

* ``_forward_kernel`` (gather, the general one): a program owns an output tile [BM tokens x B] of one
  block-row r and walks the row's slots along the flattened reduction dimension p = k*B + j, KSB
  positions a step: KSB >= B gathers KSB/B slots' activation boxes side by side (a 64..128-deep
  ``tl.dot`` even for 16x16 blocks), KSB < B walks a block in parts (smaller stages, deeper
  pipelines). Programs run in a grouped order (GROUP_M token tiles visit all block-rows) so an
  activation panel stays in L2. For decode-sized inputs the slots are split over SPLIT programs
  writing float32 partials, summed in a fixed order by ``_reduce_partials_kernel`` (+ bias, cast).
* ``forward_tma._forward_tma_kernel`` (B >= 128, many tokens, Hopper): the same walk with the activation box
  and the block part loaded as tensor-memory copies through tensor descriptors.
* ``tiles._tile_kernel`` (B <= 32, many tokens, dense enough: tiles.TILE_MIN_DENSITY): masked-dense tiles; the weight tile is
  materialised from the blocks through an [R, C] slot table (absent blocks read as zeros), so an
  activation tile serves 128 outputs instead of B. Also serves grad_input (backward.py).

Launcher contract: forward(x [M, in], values [R, K, B, B], col_indices [R, K], bias [out] | None)
-> y [M, out] in x's dtype, float32 accumulation; tf32 only when torch allows it for matmuls.
Autotuned per (token-count bucket, shape, K, B), never on col_indices values.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, grouped_tile, cdiv, dot_precision, interpreter_upcast, m_bucket, mma, num_sms, tuning_candidates,
)
from sparsify.kernels.forward_tma import forward_tma, use_tma
from sparsify.kernels.launch import launch
from sparsify.kernels.tiles import slot_table, tile_matmul, use_tiles

# Autotune configs as data: (BM tokens, KSB reduction depth per step, num_warps, num_stages).
# KSB >= B gathers KSB/B whole slots per step; KSB < B walks a block in KSB-wide parts (more stages fit).
# The pruner keeps those that fit the block size and the token count (see _prune_configs).
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
REDUCE_BLOCK = 1024

def _configs():
    return [
        triton.Config({"BM": bm, "KSB": ksb}, num_warps=w, num_stages=s) for bm, ksb, w, s in FORWARD_CONFIGS
    ]


def _fits(bm: int, ksb: int, block: int, m_bucket: int, elem: int, stages: int) -> bool:
    if ksb > 8 * block or (ksb < block and (ksb < 64 or block % ksb)):  # part of a slot (>= 64) .. 8 slots
        return False
    small = m_bucket <= 32
    if small != (bm <= 32):  # decode tiles for decode inputs, prefill tiles otherwise
        return False
    # shared memory per pipeline stage: x tile [BM, KS*B] + block tile [KS*B, B]
    # Triton 3.6/3.9 keep stages - 2 data buffers here (the slot-index load takes a pipeline stage)
    smem = (bm * ksb + ksb * block) * elem * max(1, stages - 2)
    return smem <= 224 * 1024


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block, m_bucket, elem = args["B"], args["M_BUCKET"], args["ELEM_BYTES"]
    kept = [
        c for c in configs if _fits(c.kwargs["BM"], c.kwargs["KSB"], block, m_bucket, elem, c.num_stages)
    ]
    if not kept:  # always leave one that is valid for the block size
        kept = [triton.Config({"BM": 16 if m_bucket <= 32 else 64, "KSB": block}, num_warps=4, num_stages=2)]
    return tuning_candidates(kept, args, lambda c: (c.kwargs["BM"] + block) * c.kwargs["KSB"] * elem)


@triton.autotune(
    configs=_configs(),
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
    M,
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
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    KSB: tl.constexpr,
):
    RUN: tl.constexpr = B if KSB >= B else KSB  # contiguous activation elements per gathered run
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m, r = grouped_tile(pid, tl.cdiv(M, BM), R)  # token tile, block-row

    # this program's slots [k_lo, k_hi) as positions p = k*B + j of the row's reduction dimension
    per_split = tl.cdiv(K, SPLIT)
    k_lo = pid_s * per_split
    k_hi = tl.minimum(k_lo + per_split, K)

    rows = pid_m * BM + tl.arange(0, BM)  # tokens
    row_ok = rows < M
    jj = tl.arange(0, KSB)  # position inside one step: KSB/B whole slots, or a KSB-wide part of one
    outs = tl.arange(0, B)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * IN_F
    v_row = v_ptr + r.to(tl.int64) * K * B * B
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in range(k_lo * B, k_hi * B, KSB):
        p = p0 + jj
        k = p // B
        j = p % B
        k_ok = k < k_hi
        col = tl.load(col_ptr + r * K + k, mask=k_ok, other=0)
        xcol = tl.max_contiguous(tl.multiple_of(col * B + j, RUN), RUN)
        xt = tl.load(x_rows + xcol[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, KSB]
        # W^T tile [KSB, B]: element (jj, i) = values[r, k, i, j]
        wt = tl.load(v_row + (k.to(tl.int64) * B * B + j)[:, None] + (outs * B)[None, :], mask=k_ok[:, None], other=0.0)
        acc = mma(xt, wt, acc, PRECISION, UPCAST)

    cols_out = r * B + outs
    if PARTIAL:
        out_ptrs = y_ptr + (pid_s * M + rows.to(tl.int64))[:, None] * N_OUT + cols_out[None, :]
        tl.store(out_ptrs, acc, mask=row_ok[:, None])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols_out).to(tl.float32)[None, :]
        out_ptrs = y_ptr + rows.to(tl.int64)[:, None] * N_OUT + cols_out[None, :]
        tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _reduce_partials_kernel(p_ptr, bias_ptr, y_ptr, M, N_OUT, SPLIT, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y[m, n] = sum_s partial[s, m, n] (s in fixed order) + bias[n]."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    total = M * N_OUT
    ok = offs < total
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):
        acc += tl.load(p_ptr + s * total + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N_OUT, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def split_slots(num_tiles: int, k: int, device: torch.device) -> int:
    """How many programs share one block-row's slots, so that small inputs still fill the GPU."""
    sms = num_sms(device)
    if num_tiles >= sms or k <= 1:
        return 1
    return max(1, min(k, cdiv(2 * sms, num_tiles), 16))


def forward(
    x: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y = x W^T + bias for x [M, in]; returns [M, out] in x's dtype.

    Tests only: ``config`` fixes the tile instead of autotuning ({"BM", "KSB", "num_warps",
    "num_stages"}, optionally "SPLIT"; or {"tile": {"BM", "BN", "BK", ...}} for the masked-dense
    kernel); ``out`` is the tensor to write (e.g. NaN-poisoned).
    """
    rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    out_features = rows * block
    col = col_indices if col_indices.dtype == torch.int32 else col_indices.to(torch.int32)
    bucket = m_bucket(num_tokens)
    tiles = config.get("tile") if config is not None and "tile" in config else None
    if tiles is not None or (config is None and use_tiles(block, k * block / in_features, num_tokens)):
        y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device) if out is None else out
        tile_matmul(x, values, slot_table(col, in_features // block), bias, y, False, tiles)
        return y
    if config is None and use_tma(x, values, block, num_tokens):
        y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device) if out is None else out
        forward_tma(x, values, col, bias, y)
        return y
    if config is not None and "SPLIT" in config:
        split = config["SPLIT"]
    else:
        tile_m = 16 if bucket <= 32 else 128
        split = split_slots(cdiv(num_tokens, tile_m) * rows, k, x.device)
    y = torch.empty(num_tokens, out_features, dtype=x.dtype, device=x.device) if out is None else out
    partial = y if split == 1 else torch.empty(split, num_tokens, out_features, dtype=torch.float32, device=x.device)
    if out is not None and split > 1:
        partial.fill_(float("nan"))
    has_bias = bias is not None
    args = (
        x,
        values,
        col,
        bias if has_bias else y,
        partial,
        num_tokens,
        bucket,
        out_features,
        in_features,
        k,
        rows,
        split,
        x.element_size(),
    )
    flags = dict(B=block, HAS_BIAS=has_bias, PARTIAL=split > 1, PRECISION=dot_precision(x.dtype), UPCAST=interpreter_upcast(x.dtype))
    if config is None:
        grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * rows, split)  # noqa: E731
        launch(_forward_kernel, grid, args, flags, x.device)
    else:
        grid = (cdiv(num_tokens, config["BM"]) * rows, split)
        _forward_kernel.fn[grid](
            *args,
            **flags,
            BM=config["BM"],
            KSB=config["KSB"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    if split > 1:
        grid = (cdiv(num_tokens * out_features, REDUCE_BLOCK),)
        launch(_reduce_partials_kernel, grid, (partial, bias if has_bias else y, y, num_tokens, out_features, split),
               dict(HAS_BIAS=has_bias, BLOCK=REDUCE_BLOCK), x.device)
    return y
