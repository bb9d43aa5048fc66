"""Masked-dense tiles for small blocks (B <= 32, many tokens, dense enough: TILE_MIN_DENSITY): the weight tile is
materialised from the blocks through an [R, C] slot table (absent blocks read as zeros), so an
activation tile serves 128 outputs instead of B. Serves the forward and grad_input (backward.py)."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, grouped_tile, cdiv, dot_precision, element_bytes, interpreter_upcast, m_bucket, mma, tuning_candidates,
)
from sparsify.kernels.launch import launch

# Masked-dense tiles for small blocks: (BM, BN, BK, num_warps, num_stages)
TILE_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]


def prune_tiles(rows_key: str, depth_key: str, cols_key: str, *multiple_of_block: str):
    """An autotune pruner for a tile kernel whose stage holds an [rows, depth] and a [depth, cols]
    operand tile: keeps the configs whose sizes under ``multiple_of_block`` are multiples of B."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if all(c.kwargs[key] % args["B"] == 0 for key in multiple_of_block)]
        elem = element_bytes(args)
        return tuning_candidates(
            kept, args, lambda c: (c.kwargs[rows_key] + c.kwargs[cols_key]) * c.kwargs[depth_key] * elem
        )

    return prune


@triton.autotune(
    configs=[
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in TILE_CONFIGS
    ],
    key=["M_BUCKET", "N", "KD", "K", "B"],
    prune_configs_by={"early_config_prune": prune_tiles("BM", "BK", "BN", "BK", "BN")},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _tile_kernel(
    a_ptr,  # [M, KD] dense operand: x (forward) or grad_out (grad_input)
    v_ptr,  # values [R, K, B, B]
    slot_ptr,  # [R, C] int32: the slot holding block (r, c), or -1
    bias_ptr,  # [N] or dummy
    c_ptr,  # [M, N]
    M,
    M_BUCKET,
    N,
    KD,
    K,
    C,
    B: tl.constexpr,
    W_ROWS_ARE_KD: tl.constexpr,  # False: forward, T = W^T; True: grad_input, T = W
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
):
    """C = A T with T [KD, N] the Block-ELL weight (or its transpose) materialized tile by tile:
    blocks a row does not keep load as zeros (masked), so the tensor cores see a dense [BK, BN]
    tile and the activation tile [BM, BK] serves BN outputs. It does the dense FLOPs; for small
    blocks that beats gathering [BM, B] boxes, which serve only B outputs each."""
    pid = tl.program_id(0)
    pid_m, pid_n = grouped_tile(pid, tl.cdiv(M, BM), tl.cdiv(N, BN))

    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    kk = tl.arange(0, BK)
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * KD
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        ka = k0 + kk
        ka_ok = ka < KD
        at = tl.load(a_rows + ka[None, :], mask=row_ok[:, None] & ka_ok[None, :], other=0.0)
        # the tile's slots, one per block [BK/B, BN/B], broadcast to every element of its block
        kb = (k0 // B + tl.arange(0, BK // B))[:, None]
        nb = (pid_n * (BN // B) + tl.arange(0, BN // B))[None, :]
        kb_ok = kb < KD // B
        nb_ok = nb < N // B
        if W_ROWS_ARE_KD:  # T[a, b] = W[a, b]: block (r, c) = (kb, nb)
            slot_b = tl.load(slot_ptr + kb * C + nb, mask=kb_ok & nb_ok, other=-1)
            base_b = (kb * K + slot_b).to(tl.int64) * B * B
        else:  # T[a, b] = W[b, a]: block (r, c) = (nb, kb)
            slot_b = tl.load(slot_ptr + nb * C + kb, mask=kb_ok & nb_ok, other=-1)
            base_b = (nb * K + slot_b).to(tl.int64) * B * B
        base_b = tl.where(slot_b >= 0, base_b, -1)
        base = tl.reshape(tl.broadcast_to(base_b[:, None, :, None], (BK // B, B, BN // B, B)), (BK, BN))
        base = tl.max_constancy(base, [B, B])
        if W_ROWS_ARE_KD:  # runs of B contiguous elements along N
            offs = base + ((ka[:, None] % B) * B + (cols[None, :] % B))
            offs = tl.max_contiguous(tl.multiple_of(offs, [1, B]), [1, B])
        else:  # along KD
            offs = base + ((cols[None, :] % B) * B + (ka[:, None] % B))
            offs = tl.max_contiguous(tl.multiple_of(offs, [B, 1]), [B, 1])
        wt = tl.load(v_ptr + offs, mask=base >= 0, other=0.0)
        acc = mma(at, wt, acc, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def slot_table(col_indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[R, C] int32: slot_table[r, c] = k where col_indices[r, k] == c, else -1 (built on the device)."""
    rows, k = col_indices.shape
    table = torch.full((rows, num_cols), -1, dtype=torch.int32, device=col_indices.device)
    slots = torch.arange(k, dtype=torch.int32, device=col_indices.device).expand(rows, k)
    return table.scatter_(1, col_indices.long(), slots)  # unique columns per row: no write conflicts


# Which kernel serves large token counts: "gather" (boxes per slot) or "tile" (masked-dense tiles).
# SPARSIFY_BLOCK_KERNEL=gather|tile overrides (benchmarks compare both).
# Masked-dense tiles do the dense FLOPs whatever the density, so they win where gathering is slower
# than that: measured on the H100 (4096<->14336, M = 8192, benchmarks/NOTES.md), gathering at B = 16
# was slower than the tiles from density 0.25 up (3.1 vs ~2.4 ms), at B = 32 faster at 0.25 (1.1 vs
# ~2.2 ms), even at 0.5 and slower at 0.75. Key: block size -> the lowest density that takes the tiles.
TILE_MIN_DENSITY = {16: 0.15, 32: 0.5}
TILE_MIN_TOKENS = 256


def use_tiles(block: int, density: float, num_tokens: int) -> bool:
    choice = os.environ.get("SPARSIFY_BLOCK_KERNEL", "auto")
    if choice == "tile":
        return True
    if choice == "gather" or num_tokens < TILE_MIN_TOKENS or block not in TILE_MIN_DENSITY:
        return False
    return density >= TILE_MIN_DENSITY[block]


def tile_matmul(a, values, table, bias, out, w_rows_are_kd: bool, config: dict | None = None) -> None:
    """out [M, N] = a [M, KD] @ (W if w_rows_are_kd else W^T), W given by values + slot table."""
    rows, k, block, _ = values.shape
    num_tokens, kd = a.shape
    n = out.shape[1]
    args = (a, values, table, bias if bias is not None else out, out, num_tokens, m_bucket(num_tokens), n, kd, k, table.shape[1])
    flags = dict(
        B=block,
        W_ROWS_ARE_KD=w_rows_are_kd,
        HAS_BIAS=bias is not None,
        PRECISION=dot_precision(a.dtype),
        UPCAST=interpreter_upcast(a.dtype),
    )
    if config is None:
        grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * cdiv(n, meta["BN"]),)  # noqa: E731
        launch(_tile_kernel, grid, args, flags, a.device)
    else:
        grid = (cdiv(num_tokens, config["BM"]) * cdiv(n, config["BN"]),)
        _tile_kernel.fn[grid](
            *args, **flags, BM=config["BM"], BN=config["BN"], BK=config["BK"],
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        )
