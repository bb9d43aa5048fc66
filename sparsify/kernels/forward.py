"""Triton Block-ELL forward: y = x W^T + bias with W stored as values [R, K, B, B] and col_indices [R, K].

One program owns an output tile [BM tokens x B] of one block-row r. It walks the row's K slots,
KS slots at a time: the activation boxes of those KS slots are gathered side by side into one
[BM, KS*B] tile (column col_indices[r, k]*B + j) and multiplied with the slots' blocks, which lie
contiguously in memory as a [KS*B, B] tile of W^T. Gathering several slots per step gives the
tensor cores a reduction depth of KS*B (64 or 128) even for 16x16 blocks.

Programs run in a grouped order (GROUP_M token tiles walk all block-rows before the next group),
so an x panel stays in L2 while the blocks stream through. For decode-sized inputs (few token
tiles, few block-rows) the slots are split over SPLIT programs that write float32 partial sums;
a second kernel adds the partials in a fixed order (deterministic), adds the bias and casts.

Launcher contract: forward(x [M, in], values [R, K, B, B], col_indices [R, K], bias [out] | None)
-> y [M, out] in x's dtype, float32 accumulation; tf32 only when torch allows it for matmuls.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# Autotune configs as data: (BM tokens, KS*B reduction depth per step, num_warps, num_stages).
# The pruner keeps those that fit the block size and the token count (see _prune_configs).
FORWARD_CONFIGS = [
    # large M
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 128, 4, 4),
    (128, 64, 4, 4),
    (256, 128, 8, 3),
    (256, 64, 8, 4),
    (64, 128, 4, 4),
    # small M (decode)
    (16, 128, 4, 4),
    (16, 256, 4, 3),
    (32, 128, 4, 4),
]
GROUP_M = tl.constexpr(8)  # token tiles per group of the grouped program order
REDUCE_BLOCK = 1024


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs():
    return [
        triton.Config({"BM": bm, "KSB": ksb}, num_warps=w, num_stages=s) for bm, ksb, w, s in FORWARD_CONFIGS
    ]


def _fits(bm: int, ksb: int, block: int, m_bucket: int, elem: int, stages: int) -> bool:
    if ksb < block or ksb > 8 * block:  # at least one slot a step, at most eight
        return False
    small = m_bucket <= 32
    if small != (bm <= 32):  # decode tiles for decode inputs, prefill tiles otherwise
        return False
    # shared memory per pipeline stage: x tile [BM, KS*B] + block tile [KS*B, B]
    smem = (bm * ksb + ksb * block) * elem * max(1, stages - 1)
    return smem <= 224 * 1024


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST is set only under the CPU interpreter, whose
    dot multiplies bfloat16 storage as integers (Triton 3.9): there the operands go to float32 first,
    which gives the same products (bf16 x bf16 is exact in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def interpreter_upcast(dtype: torch.dtype) -> bool:
    return _interpreting() and dtype == torch.bfloat16


def _prune_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block, m_bucket, elem = args["B"], args["M_BUCKET"], args["ELEM_BYTES"]
    kept = [
        c for c in configs if _fits(c.kwargs["BM"], c.kwargs["KSB"], block, m_bucket, elem, c.num_stages)
    ]
    if not kept:  # always leave one that is valid for the block size
        kept = [triton.Config({"BM": 16 if m_bucket <= 32 else 64, "KSB": block}, num_warps=4, num_stages=2)]
    if _interpreting():  # no timing on the CPU interpreter
        kept = kept[:1]
    return kept


@triton.autotune(
    configs=_configs(),
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B", "SPLIT"],
    prune_configs_by={"early_config_prune": _prune_configs},
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
    KS: tl.constexpr = KSB // B
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    # grouped order: GROUP_M token tiles visit every block-row before the next group starts
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * R
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    r = (pid % per_group) // group_size

    # this program's slots: [k_lo, k_hi)
    per_split = tl.cdiv(K, SPLIT)
    k_lo = pid_s * per_split
    k_hi = tl.minimum(k_lo + per_split, K)

    rows = pid_m * BM + tl.arange(0, BM)  # tokens
    row_ok = rows < M
    jj = tl.arange(0, KSB)  # position inside the gathered reduction tile
    slot_in_step = jj // B
    j = jj % B
    outs = tl.arange(0, B)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * IN_F
    v_row = v_ptr + r.to(tl.int64) * K * B * B
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, KS):
        k = k0 + slot_in_step
        k_ok = k < k_hi
        col = tl.load(col_ptr + r * K + k, mask=k_ok, other=0)
        xcol = tl.max_contiguous(tl.multiple_of(col * B + j, B), B)
        xt = tl.load(x_rows + xcol[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, KS*B]
        # W^T tile [KS*B, B]: element (jj, i) = values[r, k, i, j]
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


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 operands only where torch allows it for matmuls (like nn.Linear); else exact."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: powers of two, capped."""
    return min(triton.next_power_of_2(max(m, 1)), 16384)


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 4


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_slots(num_tiles: int, k: int, device: torch.device) -> int:
    """How many programs share one block-row's slots, so that small inputs still fill the GPU."""
    sms = num_sms(device)
    if num_tiles >= sms or k <= 1:
        return 1
    return max(1, min(k, triton.cdiv(2 * sms, num_tiles), 16))


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
    "num_stages"}, optionally "SPLIT"); ``out`` is the tensor to write (e.g. NaN-poisoned).
    """
    rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    out_features = rows * block
    col = col_indices if col_indices.dtype == torch.int32 else col_indices.to(torch.int32)
    bucket = m_bucket(num_tokens)
    if config is not None and "SPLIT" in config:
        split = config["SPLIT"]
    else:
        tile_m = 16 if bucket <= 32 else 128
        split = split_slots(triton.cdiv(num_tokens, tile_m) * rows, k, x.device)
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
        grid = lambda meta: (triton.cdiv(num_tokens, meta["BM"]) * rows, split)  # noqa: E731
        _forward_kernel[grid](*args, **flags)
    else:
        grid = (triton.cdiv(num_tokens, config["BM"]) * rows, split)
        _forward_kernel.fn[grid](
            *args,
            **flags,
            BM=config["BM"],
            KSB=config["KSB"],
            num_warps=config.get("num_warps", 4),
            num_stages=config.get("num_stages", 2),
        )
    if split > 1:
        grid = (triton.cdiv(num_tokens * out_features, REDUCE_BLOCK),)
        _reduce_partials_kernel[grid](
            partial, bias if has_bias else y, y, num_tokens, out_features, split, HAS_BIAS=has_bias, BLOCK=REDUCE_BLOCK
        )
    return y
