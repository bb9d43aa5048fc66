"""Triton Block-ELL backward: grad_input (no atomics) and grad_values (fixed reduction order).

grad_input: dL/dx = grad_out W. Block-column c of dL/dx gathers from every slot (r, k) whose
col_indices[r, k] == c. The launcher builds the column-major view of the topology on the device
each call (``_column_view_kernel``: one launch, no host sync, always in sync with the topology):
`slots_by_col` lists the flat slots r*K + k column by column and `col_start[c] : col_start[c+1]`
is column c's stretch. One program owns an output tile [BM tokens x B]
of one column and walks its stretch TS entries at a time: the grad_out boxes of those entries'
block-rows are gathered into one [BM, TS*B] tile and multiplied with their blocks ([TS*B, B],
each block read as stored). Every output element is written by exactly one program in one fixed
order, so the result is bitwise reproducible; columns no slot uses are written as zeros.

grad_values: dL/dvalues[r, k] = grad_out[:, r]^T x[:, col_indices[r, k]] summed over tokens.
One program owns block-row r and GS consecutive slots: it walks the tokens BM at a time in order,
multiplying the GS gathered, transposed activation boxes [GS*B, BM] with the grad_out box [BM, B].
When there are too few programs to fill the GPU (few block-rows, many tokens) the tokens are split
into SPLIT fixed ranges with float32 partial sums, added afterwards in a fixed order.

Small blocks (B <= 32, many tokens; forward.use_tiles) take masked-dense tiles instead: grad_input
is forward's ``_tile_kernel`` on W, and ``_tile_grad_values_kernel`` computes dense [BO, BI] tiles of
grad_out^T x in token order and stores only the kept blocks. Both are deterministic too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sparsify.kernels.common import (
    AUTOTUNE_TIMER, grouped_tile, cdiv, dot_precision, interpreter_upcast, m_bucket, mma, num_sms, tuning_candidates,
)
from sparsify.kernels.forward import REDUCE_BLOCK, _reduce_partials_kernel
from sparsify.kernels.column_view import column_view
from sparsify.kernels.launch import launch
from sparsify.kernels.tiles import TILE_CONFIGS, prune_tiles, slot_table, tile_matmul, use_tiles

# (BM tokens, TS*B or GS*B reduction/gather width, num_warps, num_stages)
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
GRAD_VALUES_CONFIGS = [
    (64, 256, 8, 3),
    (64, 128, 4, 4),
    (128, 128, 8, 3),
    (128, 64, 4, 5),
    (64, 128, 4, 5),
    (32, 128, 4, 3),
    (16, 128, 4, 3),
]


@triton.jit
def token_range(pid_s, M, BT: tl.constexpr, SPLIT):
    """Tokens [lo, hi) of split ``pid_s`` when M tokens are cut into SPLIT ranges of whole BT-token tiles."""
    per_split = tl.cdiv(tl.cdiv(M, BT), SPLIT) * BT
    lo = pid_s * per_split
    return lo, tl.minimum(lo + per_split, M)


def _fits(bm: int, width: int, block: int, bucket: int, elem: int, stages: int, acc_cols: int) -> bool:
    if width > 8 * block or (width < block and (width < 64 or block % width)):
        return False
    if (bucket <= 32) != (bm <= 32):
        return False
    # a first cut for the autotuner (it skips configs that turn out not to fit; see forward._fits). Not
    # exact: grad_values loads no index inside its loop and keeps all `stages` buffers (an H100 launch of
    # (64, 256, 8, 3) in float32 asked for 240 KB); tuning_candidates is exact where nothing is timed.
    smem = (bm * width + width * acc_cols) * elem * max(1, stages - 2)
    return smem <= 200 * 1024


def _prune(configs, named_args, width_key, acc_cols_of, **kwargs):
    args = {**named_args, **kwargs}
    block, bucket, elem = args["B"], args["M_BUCKET"], args["ELEM_BYTES"]
    kept = [
        c
        for c in configs
        if _fits(c.kwargs["BM"], c.kwargs[width_key], block, bucket, elem, c.num_stages, acc_cols_of(c, block))
    ]
    if not kept:
        kept = [triton.Config({"BM": 16 if bucket <= 32 else 64, width_key: block}, num_warps=4, num_stages=2)]
    return tuning_candidates(
        kept, args, lambda c: (c.kwargs["BM"] * c.kwargs[width_key] + c.kwargs[width_key] * acc_cols_of(c, block)) * elem
    )


def _prune_grad_input(configs, named_args, **kwargs):
    return _prune(configs, named_args, "TSB", lambda c, b: b, **kwargs)


def _prune_grad_values(configs, named_args, **kwargs):
    # grad_values' tiles are [BM, B] grad_out and [BM, GS*B] activations
    return _prune(configs, named_args, "GSB", lambda c, b: b * c.kwargs["BM"] // c.kwargs["GSB"], **kwargs)


def _make(configs, width_key):
    return [triton.Config({"BM": bm, width_key: w}, num_warps=nw, num_stages=ns) for bm, w, nw, ns in configs]


@triton.autotune(
    configs=_make(GRAD_INPUT_CONFIGS, "TSB"),
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
    M,
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
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < M
    tt = tl.arange(0, TSB)  # TSB/B whole entries per step, or a TSB-wide part of one
    js = tl.arange(0, B)
    g_rows = g_ptr + rows.to(tl.int64)[:, None] * N_OUT
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in range(lo * B, hi * B, TSB):  # positions p = t*B + i along the column's stretch
        p = p0 + tt
        t = p // B
        i = p % B
        t_ok = t < hi
        slot = tl.load(slots_ptr + t, mask=t_ok, other=0)
        r = slot // K
        gcol = tl.max_contiguous(tl.multiple_of(r * B + i, RUN), RUN)
        gt = tl.load(g_rows + gcol[None, :], mask=row_ok[:, None] & t_ok[None, :], other=0.0)  # [BM, TSB]
        # block tile [TSB, B]: element (tt, j) = values[slot, i, j], rows read as stored
        vt = tl.load(v_ptr + (slot.to(tl.int64) * B * B + i * B)[:, None] + js[None, :], mask=t_ok[:, None], other=0.0)
        acc = mma(gt, vt, acc, PRECISION, UPCAST)
    out = gx_ptr + rows.to(tl.int64)[:, None] * IN_F + (c * B + js)[None, :]
    tl.store(out, acc.to(gx_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.autotune(
    configs=_make(GRAD_VALUES_CONFIGS, "GSB"),
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
    M,
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
    xcol = tl.max_contiguous(tl.multiple_of(col * B + j, RUN), RUN)
    outs = tl.arange(0, B)

    m_lo, m_hi = token_range(pid_s, M, BM, SPLIT)
    # acc[p - p0, i] = dvalues[r, k, i, j]: the gathered side is the tall operand (tensor-core M)
    acc = tl.zeros((GSB, B), dtype=tl.float32)
    for m0 in range(m_lo, m_hi, BM):
        rows = m0 + tl.arange(0, BM)
        row_ok = rows < m_hi
        xt = tl.load(x_ptr + rows.to(tl.int64)[None, :] * IN_F + xcol[:, None], mask=row_ok[None, :] & k_ok[:, None], other=0.0)  # [GS*B, BM]
        gt = tl.load(g_ptr + rows.to(tl.int64)[:, None] * N_OUT + (r * B + outs)[None, :], mask=row_ok[:, None], other=0.0)  # [BM, B]
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
    M,
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
    """Small blocks: a dense [BO, BI] tile of grad_out^T x, summed over the tokens in order, of
    which only the blocks the topology keeps are stored (into their slots)."""
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


def grad_input(
    grad_out: torch.Tensor,
    values: torch.Tensor,
    col_indices: torch.Tensor,
    in_features: int,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dx = grad_out W for grad_out [M, out]; returns [M, in] in grad_out's dtype.

    Tests only: ``config`` fixes the tile ({"BM", "TSB", "num_warps", "num_stages"}); ``out`` is the
    tensor to write (e.g. NaN-poisoned)."""
    rows, k, block, _ = values.shape
    num_tokens, out_features = grad_out.shape
    num_cols = in_features // block
    grad_x = torch.empty(num_tokens, in_features, dtype=grad_out.dtype, device=grad_out.device) if out is None else out
    tiles = config.get("tile") if config is not None and "tile" in config else None
    if tiles is not None or (config is None and use_tiles(block, k / num_cols, num_tokens)):
        tile_matmul(grad_out, values, slot_table(col_indices, num_cols), None, grad_x, True, tiles)
        return grad_x
    slots_by_col, col_start = column_view(col_indices, num_cols)
    args = (
        grad_out,
        values,
        slots_by_col,
        col_start,
        grad_x,
        num_tokens,
        m_bucket(num_tokens),
        out_features,
        in_features,
        k,
        num_cols,
        grad_out.element_size(),
    )
    flags = dict(B=block, PRECISION=dot_precision(grad_out.dtype), UPCAST=interpreter_upcast(grad_out.dtype))
    if config is None:
        grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * num_cols,)  # noqa: E731
        launch(_grad_input_kernel, grid, args, flags, grad_out.device)
    else:
        grid = (cdiv(num_tokens, config["BM"]) * num_cols,)
        _grad_input_kernel.fn[grid](
            *args,
            **flags,
            BM=config["BM"],
            TSB=config["TSB"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    return grad_x


def split_tokens(programs: int, num_tokens: int, device: torch.device) -> int:
    """Token ranges for grad_values when block-rows x slot groups alone cannot fill the GPU."""
    sms = num_sms(device)
    if programs >= sms or num_tokens < 1024:
        return 1
    return max(1, min(cdiv(2 * sms, programs), num_tokens // 512, 16))


def grad_values(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    col_indices: torch.Tensor,
    block_size: int,
    *,
    config: dict | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dL/dvalues = grad_out^T x sampled at the kept blocks: [R, K, B, B] in grad_out's dtype.

    Tests only: ``config`` fixes the tile ({"BM", "GSB", "num_warps", "num_stages"}, optionally
    "SPLIT"); ``out`` is the tensor to write (e.g. NaN-poisoned)."""
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    rows, k = col_indices.shape
    block = block_size
    col = col_indices if col_indices.dtype == torch.int32 else col_indices.to(torch.int32)
    num_cols = in_features // block
    tiles = config.get("tile") if config is not None and "tile" in config else None
    tiled = tiles is not None or (config is None and use_tiles(block, k / num_cols, num_tokens))
    if config is not None and "SPLIT" in config:
        split = config["SPLIT"]
    elif tiled:
        split = split_tokens(cdiv(out_features, 128) * cdiv(in_features, 128), num_tokens, x.device)
    else:
        split = split_tokens(rows * cdiv(k, max(1, 128 // block)), num_tokens, x.device)
    dv = torch.empty(rows, k, block, block, dtype=grad_out.dtype, device=grad_out.device) if out is None else out
    target = dv if split == 1 else torch.empty(split, rows, k, block, block, dtype=torch.float32, device=x.device)
    if out is not None and split > 1:
        target.fill_(float("nan"))
    if tiled:
        table = slot_table(col, num_cols)
        targs = (grad_out, x, table, target, num_tokens, m_bucket(num_tokens), out_features, in_features, k, rows, num_cols, split)
        tflags = dict(B=block, PARTIAL=split > 1, PRECISION=dot_precision(x.dtype), UPCAST=interpreter_upcast(x.dtype))
        if tiles is None:
            grid = lambda meta: (cdiv(out_features, meta["BO"]) * cdiv(in_features, meta["BI"]), split)  # noqa: E731
            launch(_tile_grad_values_kernel, grid, targs, tflags, x.device)
        else:
            grid = (cdiv(out_features, tiles["BO"]) * cdiv(in_features, tiles["BI"]), split)
            _tile_grad_values_kernel.fn[grid](
                *targs, **tflags, BO=tiles["BO"], BI=tiles["BI"], BT=tiles["BT"],
                num_warps=tiles.get("num_warps", 4), num_stages=tiles.get("num_stages", 2),
            )
        if split > 1:
            total = rows * k * block * block
            launch(_reduce_partials_kernel, (cdiv(total, REDUCE_BLOCK),), (target, dv, dv, 1, total, split),
                   dict(HAS_BIAS=False, BLOCK=REDUCE_BLOCK), x.device)
        return dv
    args = (
        grad_out,
        x,
        col,
        target,
        num_tokens,
        m_bucket(num_tokens),
        out_features,
        in_features,
        k,
        rows,
        split,
        grad_out.element_size(),
    )
    flags = dict(
        B=block, PARTIAL=split > 1, PRECISION=dot_precision(grad_out.dtype), UPCAST=interpreter_upcast(grad_out.dtype)
    )
    if config is None:
        grid = lambda meta: (rows * cdiv(k * block, meta["GSB"]), split)  # noqa: E731
        launch(_grad_values_kernel, grid, args, flags, x.device)
    else:
        grid = (rows * cdiv(k * block, config["GSB"]), split)
        _grad_values_kernel.fn[grid](
            *args,
            **flags,
            BM=config["BM"],
            GSB=config["GSB"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    if split > 1:
        total = rows * k * block * block
        launch(_reduce_partials_kernel, (cdiv(total, REDUCE_BLOCK),), (target, dv, dv, 1, total, split),
               dict(HAS_BIAS=False, BLOCK=REDUCE_BLOCK), x.device)
    return dv
