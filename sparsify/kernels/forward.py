"""Triton Block-ELL forward: y = x W^T + bias with W stored as values [R, K, B, B] and col_indices [R, K].

Three kernels; the launcher picks one (measured choices, see benchmarks/NOTES.md):

* ``_forward_kernel`` (gather, the general one): a program owns an output tile [BM tokens x B] of one
  block-row r and walks the row's slots along the flattened reduction dimension p = k*B + j, KSB
  positions a step: KSB >= B gathers KSB/B slots' activation boxes side by side (a 64..128-deep
  ``tl.dot`` even for 16x16 blocks), KSB < B walks a block in parts (smaller stages, deeper
  pipelines). Programs run in a grouped order (GROUP_M token tiles visit all block-rows) so an
  activation panel stays in L2. For decode-sized inputs the slots are split over SPLIT programs
  writing float32 partials, summed in a fixed order by ``_reduce_partials_kernel`` (+ bias, cast).
* ``_forward_tma_kernel`` (B >= 128, many tokens, Hopper): the same walk with the activation box
  and the block part loaded as tensor-memory copies through tensor descriptors.
* ``_tile_kernel`` (B <= 32, many tokens, density >= 0.3): masked-dense tiles; the weight tile is
  materialised from the blocks through an [R, C] slot table (absent blocks read as zeros), so an
  activation tile serves 128 outputs instead of B. Also serves grad_input (backward.py).

Launcher contract: forward(x [M, in], values [R, K, B, B], col_indices [R, K], bias [out] | None)
-> y [M, out] in x's dtype, float32 accumulation; tf32 only when torch allows it for matmuls.
Autotuned per (token-count bucket, shape, K, B), never on col_indices values.
"""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
import triton.testing

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
GROUP_M = tl.constexpr(8)  # token tiles per group of the grouped program order
REDUCE_BLOCK = 1024


def _quick_bench(fn, quantiles=None):
    """Autotuning timer: short runs keep first-call tuning brief (medians of ~20 ms)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# passed to every @triton.autotune here, where this Triton accepts it
AUTOTUNE_TIMER = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Below this many multiply-adds a problem takes the first fitting config instead of timing them all:
# each config costs seconds of compilation on first call, more than a small layer ever gains back
# (measured: a 4-layer quick-start Llama spent 123 s tuning on an H100 before this rule).
AUTOTUNE_MIN_MACS = 1 << 31


def tune_one_config(args: dict) -> bool:
    """True where autotuning should keep a single config: under the interpreter, or for small problems."""
    if _interpreting():
        return True
    out_features = args.get("N_OUT", args.get("N", 0))
    return args["M_BUCKET"] * out_features * args["K"] * args["B"] < AUTOTUNE_MIN_MACS


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
    return kept[:1] if tune_one_config(args) else kept


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
    # grouped order: GROUP_M token tiles visit every block-row before the next group starts
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * R
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    r = (pid % per_group) // group_size

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


# Masked-dense tiles for small blocks: (BM, BN, BK, num_warps, num_stages)
TILE_CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
]


def _prune_tile_configs(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block = args["B"]
    kept = [c for c in configs if c.kwargs["BK"] % block == 0 and c.kwargs["BN"] % block == 0]
    return kept[:1] if tune_one_config(args) else kept


@triton.autotune(
    configs=[
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s) for bm, bn, bk, w, s in TILE_CONFIGS
    ],
    key=["M_BUCKET", "N", "KD", "K", "B"],
    prune_configs_by={"early_config_prune": _prune_tile_configs},
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
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size

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
TILE_MAX_BLOCK = 32  # tiles for B <= this ...
TILE_MIN_DENSITY = 0.3  # ... when at least this fraction of blocks is kept
TILE_MIN_TOKENS = 256


def use_tiles(block: int, density: float, num_tokens: int) -> bool:
    choice = os.environ.get("SPARSIFY_BLOCK_KERNEL", "auto")
    if choice == "tile":
        return True
    if choice == "gather" or num_tokens < TILE_MIN_TOKENS:
        return False
    return block <= TILE_MAX_BLOCK and density >= TILE_MIN_DENSITY


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
        _tile_kernel[grid](*args, **flags)
    else:
        grid = (cdiv(num_tokens, config["BM"]) * cdiv(n, config["BN"]),)
        _tile_kernel.fn[grid](
            *args, **flags, BM=config["BM"], BN=config["BN"], BK=config["BK"],
            num_warps=config.get("num_warps", 4), num_stages=config.get("num_stages", 2),
        )


# Tensor-memory (TMA) variant for large blocks on Hopper: the activation box [BM, KC] at the
# dynamic column col*B + j0 and the block part [B, KC] are bulk copies through tensor descriptors.
# (BM, KC, num_warps, num_stages); KC divides B.
TMA_CONFIGS = [
    (128, 64, 4, 4),
    (128, 64, 8, 5),
    (256, 64, 8, 4),
    (128, 128, 8, 3),
]


def _tma_blocks(nargs):
    nargs["x_desc"].block_shape = [nargs["BM"], nargs["KC"]]
    nargs["v_desc"].block_shape = [nargs["B"], nargs["KC"]]


def _prune_tma(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    block, elem = args["B"], args["ELEM_BYTES"]
    kept = [
        c for c in configs
        if block % c.kwargs["KC"] == 0
        and (c.kwargs["BM"] + block) * c.kwargs["KC"] * elem * max(1, c.num_stages - 2) <= 224 * 1024
    ]
    kept = kept or [triton.Config({"BM": 64, "KC": 64}, num_warps=4, num_stages=3, pre_hook=_tma_blocks)]
    return kept[:1] if tune_one_config(args) else kept


@triton.autotune(
    configs=[
        triton.Config({"BM": bm, "KC": kc}, num_warps=w, num_stages=s, pre_hook=_tma_blocks)
        for bm, kc, w, s in TMA_CONFIGS
    ],
    key=["M_BUCKET", "N_OUT", "IN_F", "K", "B"],
    prune_configs_by={"early_config_prune": _prune_tma},
    **AUTOTUNE_TIMER,
)
@triton.jit(do_not_specialize=["M"])
def _forward_tma_kernel(
    x_desc,  # x [M, IN_F], block [BM, KC]
    v_desc,  # values as [R*K*B, B], block [B, KC]
    col_ptr,
    bias_ptr,
    y_ptr,
    M,
    M_BUCKET,
    N_OUT,
    IN_F,
    K,
    R,
    ELEM_BYTES,
    B: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    BM: tl.constexpr,
    KC: tl.constexpr,
):
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    per_group = GROUP_M * R
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    r = (pid % per_group) // group_size
    m0 = pid_m * BM
    acc = tl.zeros((BM, B), dtype=tl.float32)
    for p0 in range(0, K * B, KC):
        k = p0 // B
        j0 = p0 % B
        col = tl.load(col_ptr + r * K + k)
        xt = x_desc.load([m0, col * B + j0])  # [BM, KC]; rows past M read as zeros
        w = v_desc.load([(r * K + k) * B, j0])  # [B, KC] = values[r, k, :, j0:j0+KC]
        acc = tl.dot(xt, w.T, acc, input_precision=PRECISION)
    rows = m0 + tl.arange(0, BM)
    outs = r * B + tl.arange(0, B)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + outs).to(tl.float32)[None, :]
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * N_OUT + outs[None, :], acc.to(y_ptr.dtype.element_ty), mask=(rows < M)[:, None])


TMA_MIN_BLOCK = 128  # measured on the H100 (benchmarks/NOTES.md): faster at B = 128, a wash at B = 64
TMA_MIN_TOKENS = 256


def use_tma(x: torch.Tensor, values: torch.Tensor, block: int, num_tokens: int) -> bool:
    """TMA forward for large blocks and many tokens on Hopper or newer. SPARSIFY_TMA=1 also takes it
    for B = 64, SPARSIFY_TMA=0 turns it off."""
    choice = os.environ.get("SPARSIFY_TMA", "auto")
    if choice == "0" or x.device.type != "cuda" or _interpreting() or num_tokens < TMA_MIN_TOKENS:
        return False
    if torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    if x.data_ptr() % 16 or values.data_ptr() % 16 or (x.shape[1] * x.element_size()) % 16:
        return False  # tensor descriptors need 16-byte aligned bases and row strides
    return block >= (64 if choice == "1" else TMA_MIN_BLOCK)


def forward_tma(x, values, col, bias, y) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    dummy = [block, 64]  # the pre-hook sets the real block shapes per config
    x_desc = TensorDescriptor(x, [num_tokens, in_features], [in_features, 1], dummy)
    v_desc = TensorDescriptor(values, [rows * k * block, block], [block, 1], dummy)
    grid = lambda meta: (cdiv(num_tokens, meta["BM"]) * rows,)  # noqa: E731
    _forward_tma_kernel[grid](
        x_desc, v_desc, col, bias if bias is not None else y, y,
        num_tokens, m_bucket(num_tokens), rows * block, in_features, k, rows, x.element_size(),
        B=block, HAS_BIAS=bias is not None, PRECISION=dot_precision(x.dtype),
    )


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function in recent Triton: microseconds a call)."""
    return -(-a // b)


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 operands only where torch allows it for matmuls (like nn.Linear); else exact."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: powers of two, capped."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)


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
        _forward_kernel[grid](*args, **flags)
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
        _reduce_partials_kernel[grid](
            partial, bias if has_bias else y, y, num_tokens, out_features, split, HAS_BIAS=has_bias, BLOCK=REDUCE_BLOCK
        )
    return y
