"""The forward over groups of G block-rows: y = x W^T + bias where each program owns G consecutive
block-rows and loads every activation box once for all of them (the listing of ``row_groups.py``).

Two designs, one per kernel, both walking the group's listed columns in increasing order:
- ``rows`` (G = 1, 2, 4): one [BM x B] accumulator per block-row; a listed column's box is multiplied
  into each row that has it (a branch per row: the multiplies a row lacks are skipped, so the
  tensor-core work is the slots' own). Fewer activation bytes, the same multiplies.
- ``union`` (any G): one [BM x G*B] accumulator; KSB/B listed columns a step are gathered side by side
  and multiplied with the group's [KSB x G*B] block tile, zeros where a row lacks a column. No branch
  and deep dots, but it multiplies the zeros too: worth it only where the gather kernel is far from
  the tensor cores' speed (small blocks), since at density d it does 1 - (1-d)^G of the dense work.
A column outside [0, C) is not listed (row_groups.py), so it reads nothing and adds nothing. Large
token counts only (no split of the slots): ``dispatch.py`` decides where these run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, cdiv, dot_precision, gather_fits, grouped_tile, interpreter_upcast, m_bucket, mma,
    tuning_candidates,
)
from sparsify.kernels.launch import launch_tile

# (BM tokens, num_warps, num_stages) of the rows kernel; (BM, KSB, num_warps, num_stages) of the union kernel
ROWS_CONFIGS = [(128, 4, 3), (128, 8, 3), (128, 4, 4), (64, 4, 4), (256, 8, 3)]
UNION_CONFIGS = [(128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 3), (256, 64, 8, 3), (64, 64, 4, 4)]


def _prune(stage_bytes_of):
    """Configs whose pipeline fits (common.gather_fits); ``stage_bytes_of(config, block, group, elem)``."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block, group, elem, bucket = args["B"], args["G"], args["ELEM_BYTES"], args["M_BUCKET"]
        kept = [c for c in configs if gather_fits(c.kwargs["BM"], c.kwargs.get("KSB", block), block, bucket,
                                                  stage_bytes_of(c, block, group, elem), c.num_stages)]
        kept = kept or [triton.Config({**configs[-1].kwargs, "BM": 64}, num_warps=4, num_stages=2)]
        return tuning_candidates(kept, args, lambda c: stage_bytes_of(c, block, group, elem))

    return prune


_rows_stage = lambda c, block, group, elem: (c.kwargs["BM"] + group * block) * block * elem  # noqa: E731
_union_stage = lambda c, block, group, elem: (c.kwargs["BM"] + group * block) * c.kwargs["KSB"] * elem  # noqa: E731


@triton.jit
def _into_row(xt, v_row, slot, acc, B: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + xt @ W^T of slot ``slot`` of the block-row at ``v_row``, or acc where the row lacks the column."""
    if slot >= 0:
        jj = tl.arange(0, B)
        wt = tl.load(v_row + slot.to(tl.int64) * B * B + jj[:, None] + (jj * B)[None, :])  # (j, i) = values[., i, j]
        acc = mma(xt, wt, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _store_row(acc, row, bias_ptr, y_ptr, tokens, token_ok, N_OUT, B: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Block-row ``row``'s output tile (+ bias); nothing where the group runs past the last block-row."""
    cols_out = row * B + tl.arange(0, B)
    exists = cols_out < N_OUT
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_out, mask=exists, other=0.0).to(tl.float32)[None, :]
    out_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * N_OUT + cols_out[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & exists[None, :])


@triton.autotune(
    configs=[triton.Config({"BM": bm}, num_warps=nw, num_stages=ns) for bm, nw, ns in ROWS_CONFIGS],
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "G"],
    prune_configs_by={"early_config_prune": _prune(_rows_stage)},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _forward_rows_kernel(
    x_ptr, v_ptr, cols_ptr, slots_ptr, counts_ptr, bias_ptr, y_ptr,
    M, M_BUCKET, N_OUT, IN_F, K, R, NG, ELEM_BYTES,
    B: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr,
):
    pid_m, group = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), NG)
    tokens = pid_m * BM + tl.arange(0, BM)
    token_ok = tokens < M
    jj = tl.arange(0, B)
    x_tokens = x_ptr + tokens.to(tl.int64)[:, None] * IN_F
    row0 = group * G
    v_row0 = v_ptr + row0.to(tl.int64) * K * B * B
    row_bytes = K * B * B
    listing0 = group * G * K
    acc0 = tl.zeros((BM, B), dtype=tl.float32)
    acc1 = tl.zeros((BM, B), dtype=tl.float32)
    acc2 = tl.zeros((BM, B), dtype=tl.float32)
    acc3 = tl.zeros((BM, B), dtype=tl.float32)
    listings = tl.load(counts_ptr + group)
    for u in range(0, listings):
        col = tl.load(cols_ptr + listing0 + u)
        xcol = tl.max_contiguous(tl.multiple_of(col * B + jj, B), B)
        xt = tl.load(x_tokens + xcol[None, :], mask=token_ok[:, None], other=0.0)  # [BM, B], once for G rows
        slot_of = slots_ptr + (listing0 + u) * G
        acc0 = _into_row(xt, v_row0, tl.load(slot_of), acc0, B, PRECISION, UPCAST)
        if G > 1:
            acc1 = _into_row(xt, v_row0 + row_bytes, tl.load(slot_of + 1), acc1, B, PRECISION, UPCAST)
        if G > 2:
            acc2 = _into_row(xt, v_row0 + 2 * row_bytes, tl.load(slot_of + 2), acc2, B, PRECISION, UPCAST)
            acc3 = _into_row(xt, v_row0 + 3 * row_bytes, tl.load(slot_of + 3), acc3, B, PRECISION, UPCAST)
    _store_row(acc0, row0, bias_ptr, y_ptr, tokens, token_ok, N_OUT, B, HAS_BIAS)
    if G > 1:
        _store_row(acc1, row0 + 1, bias_ptr, y_ptr, tokens, token_ok, N_OUT, B, HAS_BIAS)
    if G > 2:
        _store_row(acc2, row0 + 2, bias_ptr, y_ptr, tokens, token_ok, N_OUT, B, HAS_BIAS)
        _store_row(acc3, row0 + 3, bias_ptr, y_ptr, tokens, token_ok, N_OUT, B, HAS_BIAS)


@triton.autotune(
    configs=[triton.Config({"BM": bm, "KSB": w}, num_warps=nw, num_stages=ns) for bm, w, nw, ns in UNION_CONFIGS],
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "G"],
    prune_configs_by={"early_config_prune": _prune(_union_stage)},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _forward_union_kernel(
    x_ptr, v_ptr, cols_ptr, slots_ptr, counts_ptr, bias_ptr, y_ptr,
    M, M_BUCKET, N_OUT, IN_F, K, R, NG, ELEM_BYTES,
    B: tl.constexpr, G: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, KSB: tl.constexpr,
):
    pid_m, group = grouped_tile(tl.program_id(0), tl.cdiv(M, BM), NG)
    tokens = pid_m * BM + tl.arange(0, BM)
    token_ok = tokens < M
    jj = tl.arange(0, KSB)  # KSB/B listed columns side by side
    wide = tl.arange(0, G * B)  # output position g*B + i of the group
    row = group * G + wide // B
    x_tokens = x_ptr + tokens.to(tl.int64)[:, None] * IN_F
    listing0 = group * G * K
    acc = tl.zeros((BM, G * B), dtype=tl.float32)
    listings = tl.load(counts_ptr + group)
    for p0 in range(0, listings * B, KSB):
        p = p0 + jj
        u = p // B
        j = p % B
        listed = u < listings
        col = tl.load(cols_ptr + listing0 + u, mask=listed, other=0)
        xcol = tl.max_contiguous(tl.multiple_of(col * B + j, B), B)
        xt = tl.load(x_tokens + xcol[None, :], mask=token_ok[:, None] & listed[None, :], other=0.0)  # [BM, KSB]
        slot = tl.load(slots_ptr + (listing0 + u)[:, None] * G + (wide // B)[None, :], mask=listed[:, None], other=-1)
        # W^T tile [KSB, G*B]: (p, g*B + i) = values[row g, slot, i, j], zero where the row lacks the column
        block = (row.to(tl.int64)[None, :] * K + slot) * B * B
        wt = tl.load(v_ptr + block + ((wide % B) * B)[None, :] + j[:, None], mask=slot >= 0, other=0.0)
        acc = mma(xt, wt, acc, PRECISION, UPCAST)
    cols_out = group * G * B + wide
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols_out, mask=row < R, other=0.0).to(tl.float32)[None, :]
    out_ptrs = y_ptr + tokens.to(tl.int64)[:, None] * N_OUT + cols_out[None, :]
    tl.store(out_ptrs, acc.to(y_ptr.dtype.element_ty), mask=token_ok[:, None] & (row < R)[None, :])


KERNELS = {"rows": _forward_rows_kernel, "union": _forward_union_kernel}


def forward_row_groups(
    x: torch.Tensor,
    values: torch.Tensor,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    out: torch.Tensor,
    design: str = "rows",
    config: dict | None = None,
) -> None:
    """y [M, out] (x's dtype, bias added) from x [M, in], values [R, K, B, B] and ``groups``, the listing
    of ``row_groups.row_groups`` (its group size is G). ``design``: "rows" (G <= 4) or "union".
    ``config``: a fixed tile ({"BM"}, the union kernel also "KSB", optional "num_warps" / "num_stages")."""
    block_rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    cols, slots, counts = groups
    num_groups, group = slots.shape[0], slots.shape[2]
    if design == "rows" and group not in (1, 2, 4):
        raise ValueError(f"the rows design takes groups of 1, 2 or 4 block-rows, not {group}")
    args = (
        x, values, cols, slots, counts, bias if bias is not None else out, out,
        num_tokens, m_bucket(num_tokens), block_rows * block, in_features, k, block_rows, num_groups,
        x.element_size(),
    )
    flags = dict(B=block, G=group, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
                 UPCAST=interpreter_upcast(x.dtype))
    grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * num_groups,)  # noqa: E731
    launch_tile(KERNELS[design], grid, args, flags, x.device, config)
