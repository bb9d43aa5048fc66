"""Masked-dense tiles for small blocks: the weight tile is materialised from the blocks through an
[R, C] slot table (absent blocks read as zeros), so an activation tile serves 128 outputs instead of
B. Serves the forward and grad_input; grad_values.py has the tile kernel of grad_values. When the
tiles run (B <= 32, many tokens, dense enough): ``dispatch.use_tiles``.

The slot table is built on the device from col_indices by ``_slot_table_kernel``; a slot whose
column is outside [0, C) is left out of it, so the tile kernels never see it (it adds nothing)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, grouped_tile, interpreter_upcast, m_bucket, mma, prune_tiles,
)
from sparsify.kernels.launch import launch, launch_tile

# Masked-dense tiles for small blocks: (BM, BN, BK, num_warps, num_stages)
TILE_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]


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
    M,  # sizes from here on: the same names in every kernel, which the autotune keys and the pruners read
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

    tokens = pid_m * BM + tl.arange(0, BM)
    token_ok = tokens < M
    cols = pid_n * BN + tl.arange(0, BN)  # output features
    col_ok = cols < N
    kk = tl.arange(0, BK)
    a_tokens = a_ptr + tokens.to(tl.int64)[:, None] * KD
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KD, BK):
        ka = k0 + kk
        ka_ok = ka < KD
        at = tl.load(a_tokens + ka[None, :], mask=token_ok[:, None] & ka_ok[None, :], other=0.0)
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
    out = c_ptr + tokens.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out, acc.to(c_ptr.dtype.element_ty), mask=token_ok[:, None] & col_ok[None, :])


@triton.jit
def _slot_table_kernel(col_ptr, table_ptr, TOTAL, K, C, CHUNK: tl.constexpr):
    """table[r, col_indices[r, k]] = k for the flat slots [pid*CHUNK, pid*CHUNK + CHUNK) whose column
    is in [0, C); the table arrives filled with -1."""
    s = tl.program_id(0) * CHUNK + tl.arange(0, CHUNK)
    in_range = s < TOTAL
    col = tl.load(col_ptr + s, mask=in_range, other=0)
    ok = in_range & (col >= 0) & (col < C)
    tl.store(table_ptr + (s // K).to(tl.int64) * C + col, (s % K).to(tl.int32), mask=ok)


SLOT_TABLE_CHUNK = 1024


@triton.jit
def _densify_kernel(v_ptr, col_ptr, w_ptr, K, C, LD, B: tl.constexpr, CB: tl.constexpr, KC: tl.constexpr):
    """W[r*B:(r+1)*B, c*B:(c+1)*B] = the block of the slot of block-row r whose column is c, or zeros, for CB
    block-columns of block-row r, as a [B rows, CB blocks, B columns] tile: rows of W stored whole, blocks
    read whole (both in runs of B contiguous elements, so both vectorize). The slots are found by comparing
    the row's column indices with the tile's columns, KC at a time (the last of repeated columns wins), so
    no slot table is built or kept (36 of them were 9.4 MB at B = 16 in bench_training's model)."""
    r = tl.program_id(0)
    cb = tl.program_id(1) * CB + tl.arange(0, CB)
    slot = tl.full((CB,), -1, tl.int32)
    for k0 in range(0, K, KC):
        ks = k0 + tl.arange(0, KC)
        col = tl.load(col_ptr + r.to(tl.int64) * K + ks, mask=ks < K, other=-1)
        found = tl.where(col[:, None] == cb[None, :], ks[:, None], -1)  # [KC, CB]
        slot = tl.maximum(slot, tl.max(found, axis=0))
    i = tl.arange(0, B)[:, None, None]
    j = tl.arange(0, B)[None, None, :]
    base = ((r * K + slot).to(tl.int64) * B * B)[None, :, None]
    tile = tl.load(v_ptr + base + i * B + j, mask=(slot >= 0)[None, :, None], other=0.0)
    out = w_ptr + (r * B + i).to(tl.int64) * LD + cb[None, :, None] * B + j
    tl.store(out, tile, mask=(cb < C)[None, :, None])


@triton.jit
def _blocks_of_kernel(d_ptr, col_ptr, out_ptr, K, C, LD, B: tl.constexpr, KB: tl.constexpr):
    """out[r, k] = dense[r*B:(r+1)*B, c*B:(c+1)*B] with c = col_indices[r, k], zeros where c is outside
    [0, C), for KB slots of block-row r as a [B rows, KB slots, B columns] tile (vector loads and stores)."""
    r = tl.program_id(0)
    k = tl.program_id(1) * KB + tl.arange(0, KB)
    col = tl.load(col_ptr + r.to(tl.int64) * K + k, mask=k < K, other=-1)
    ok = ((col >= 0) & (col < C))[None, :, None]
    i = tl.arange(0, B)[:, None, None]
    j = tl.arange(0, B)[None, None, :]
    src = d_ptr + (r * B + i).to(tl.int64) * LD + col.to(tl.int64)[None, :, None] * B + j
    tile = tl.load(src, mask=ok, other=0.0)
    dst = out_ptr + ((r * K + k).to(tl.int64) * B * B)[None, :, None] + i * B + j
    tl.store(dst, tile, mask=(k < K)[None, :, None])


def blocks_of(dense: torch.Tensor, col_indices: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [R, K, B, B] = the blocks of dense [R*B, C*B] (a row stride of its own allowed) at the slots'
    columns; zeros for a slot whose column is outside [0, C)."""
    block_rows, k, block, _ = out.shape
    kb = max(1, 8192 // (block * block))
    launch(_blocks_of_kernel, (block_rows, cdiv(k, kb)),
           (dense, col_indices, out, k, dense.shape[1] // block, dense.stride(0)), dict(B=block, KB=kb), out.device)
    return out


def densify(values: torch.Tensor, col_indices: torch.Tensor, num_cols: int, out: torch.Tensor) -> torch.Tensor:
    """out [R*B, C*B] (a row stride of its own allowed) = the dense weight from the blocks at their slots'
    columns (int32 col_indices [R, K]): each element written once, zeros where no slot has the column (a
    slot whose column is outside [0, C) adds nothing)."""
    block_rows, k, block, _ = values.shape
    cb = max(1, 8192 // (block * block))  # ~8K elements of W a program (B = 16: 32 blocks; B = 128: one)
    launch(_densify_kernel, (block_rows, cdiv(num_cols, cb)), (values, col_indices, out, k, num_cols, out.stride(0)),
           dict(B=block, CB=cb, KC=max(16, min(128, 4096 // cb))), values.device)
    return out


def slot_table(col_indices: torch.Tensor, num_cols: int) -> torch.Tensor:
    """[R, C] int32: slot_table[r, c] = k where col_indices[r, k] == c, else -1 (built on the device;
    unique columns per row: no write conflicts)."""
    block_rows, k = col_indices.shape
    flat = col_indices.reshape(-1)
    flat = flat if flat.dtype == torch.int32 else flat.to(torch.int32)
    table = torch.full((block_rows, num_cols), -1, dtype=torch.int32, device=col_indices.device)
    launch(_slot_table_kernel, (cdiv(flat.numel(), SLOT_TABLE_CHUNK),), (flat, table, flat.numel(), k, num_cols),
           dict(CHUNK=SLOT_TABLE_CHUNK), flat.device)
    return table


def tile_matmul(a, values, table, bias, out, w_rows_are_kd: bool, config: dict | None = None) -> None:
    """out [M, N] = a [M, KD] @ (W if w_rows_are_kd else W^T), W given by values + slot table.
    ``config``: a fixed tile {"BM", "BN", "BK", "num_warps", "num_stages"} instead of autotuning."""
    _, k, block, _ = values.shape
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
    grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * cdiv(n, meta["BN"]),)  # noqa: E731
    launch_tile(_tile_kernel, grid, args, flags, a.device, config)
