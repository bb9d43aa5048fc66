"""Decode (at most 16 tokens) with the activations kept on chip, in Gluon (Hopper): a design under test, not
routed (benchmarks/decode_split.py times it as "x in shared memory").

Why: the gather forward re-reads each activation box for every block-row that has its column, so at B = 16
it moves as many bytes through L2 as the weights themselves and sits near dense's speed (benchmarks/NOTES.md,
sixth session). Here one program an SM stages x [M, in] once into shared memory as [C, 16, B] boxes (async
copies, all in flight together) and walks its block-rows (r = pid, pid + P, ...), streaming only the weights:
each stage of a TMA ring brings S consecutive slots of a row (values[r, k:k+S] is one contiguous [S*B, B] box),
and each slot's MMA (mma_v2, 16 tokens) reads its activation box from shared memory by its runtime column
(``x_smem.index(col)``, which plain Triton cannot). Every output element sums its slots in slot order, one
program writes it: deterministic, no atomics. A slot whose column is outside [0, C) adds nothing.

Fits where x does: 16 * in * 2 bytes of shared memory beside the ring (in <= 4096 at bf16); wider layers
would need column chunks with partials (not built).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparsify.kernels.common import cdiv

# Triton 3.9 calls the copies async_load; 3.6 has only the long names
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_copy_load = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
_cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier  # 3.9: barrier, 3.6: thread_barrier
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
BM = gl.constexpr(16)  # token rows of every MMA (decode inputs padded to it)
X_CHUNK = gl.constexpr(16)  # activation boxes staged by one async copy
SHARED_BYTES = 232448 - 2048
PUBLIC_REINTERPRET = hasattr(gl.shared_memory_descriptor, "reinterpret")


@gluon.jit
def _stage_x(x_ptr, x_smem, M, IN_F, C, B: gl.constexpr, C_PAD: gl.constexpr, num_warps: gl.constexpr):
    """x [M, IN_F] into x_smem [C_PAD, BM, B] (token rows past M and boxes past C as zeros), viewed as rows
    [C_PAD * BM, B] (row c * BM + t: token t of box c), X_CHUNK boxes an async copy, all issued before one wait."""
    ACROSS: gl.constexpr = B // 8  # threads along a box row (8 elements, 16 bytes, each)
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [32 // ACROSS, ACROSS], [num_warps, 1], [1, 0])
    rows = x_smem
    q = gl.arange(0, X_CHUNK * BM, layout=gl.SliceLayout(1, layout))[:, None]  # box c0 + q // BM, token q % BM
    j = gl.arange(0, B, layout=gl.SliceLayout(0, layout))[None, :]
    t = q % BM
    for c0 in gl.static_range(0, C_PAD, X_CHUNK):  # static: a shared-memory slice starts at a constant
        c = c0 + q // BM
        ptrs = x_ptr + t.to(gl.int64) * IN_F + c * B + j
        _copy_load(rows.slice(c0 * BM, X_CHUNK * BM), ptrs, mask=(t < M) & (c < C))
    async_copy.commit_group()
    async_copy.wait_group(0)  # this thread's copies landed
    _cta_barrier()  # and every other thread's, before any reads a box


@gluon.jit
def _decode_kernel(x_ptr, v_desc, col_ptr, y_ptr, M, IN_F, N_OUT, K, R, NUM_PROGRAMS,
                   B: gl.constexpr, S: gl.constexpr, STAGES: gl.constexpr, C_PAD: gl.constexpr,
                   PUBLIC_REINTERPRET: gl.constexpr, num_warps: gl.constexpr):
    pid = gl.program_id(0)
    C = IN_F // B
    x_layout: gl.constexpr = gl.SwizzledSharedLayout(8, 1, 1, [1, 0])  # a [16, B] box a row of the buffer
    x_rows = gl.allocate_shared_memory(x_ptr.dtype.element_ty, [C_PAD * 16, B], x_layout)  # row c * 16 + t
    if PUBLIC_REINTERPRET:  # Triton 3.9 names it reinterpret, 3.6 _reinterpret
        x_smem = x_rows.reinterpret(x_ptr.dtype.element_ty, [C_PAD, 16, B], x_layout)  # box c: x_smem.index(c)
    else:
        x_smem = x_rows._reinterpret(x_ptr.dtype.element_ty, [C_PAD, 16, B], x_layout)
    w_ring = gl.allocate_shared_memory(v_desc.dtype, [STAGES, S * B, B], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    fence_async_shared()
    _stage_x(x_ptr, x_rows, M, IN_F, C, B, C_PAD, num_warps)

    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, num_warps],
                                                  instr_shape=[16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    col_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, S, layout=col_layout)

    rows = gl.cdiv(R - pid, NUM_PROGRAMS)  # this program's block-rows: pid, pid + P, ...
    chunks = gl.cdiv(K, S)
    total = rows * chunks  # the ring walks every (row, chunk) of the program in order
    for n in gl.static_range(STAGES):  # prologue: the first STAGES chunks in flight
        if n < total:
            r = pid + (n // chunks) * NUM_PROGRAMS
            mbarrier.expect(ready.index(n), v_desc.block_type.nbytes)
            _tma_load(v_desc, [(r * K + (n % chunks) * S) * B, 0], ready.index(n), w_ring.index(n))

    outs = gl.arange(0, B, layout=gl.SliceLayout(0, mma))
    tokens = gl.arange(0, 16, layout=gl.SliceLayout(1, mma))
    acc = gl.zeros((16, B), gl.float32, mma)
    stage = pid - pid
    phase = pid - pid
    for n in range(total):
        r = pid + (n // chunks) * NUM_PROGRAMS
        k0 = (n % chunks) * S
        ks = k0 + idx
        cols = gl.load(col_ptr + r * K + ks, mask=ks < K, other=-1)
        mbarrier.wait(ready.index(stage), phase)
        w_stage = w_ring.index(stage)
        for i in gl.static_range(S):
            col = gl.sum(gl.where(idx == i, cols, 0), axis=0)
            valid = (col >= 0) & (col < C)
            a = x_smem.index(gl.where(valid, col, 0)).load(a_layout)
            a = gl.where(valid, a, gl.zeros_like(a))
            b = w_stage.slice(i * B, B).permute((1, 0)).load(b_layout)
            acc = mma_v2(a, b, acc)
        if n + STAGES < total:  # the stage is read: refill it with the chunk STAGES ahead
            _cta_barrier()  # every warp's reads of the stage done before the copy overwrites it
            m = n + STAGES
            rr = pid + (m // chunks) * NUM_PROGRAMS
            mbarrier.expect(ready.index(stage), v_desc.block_type.nbytes)
            _tma_load(v_desc, [(rr * K + (m % chunks) * S) * B, 0], ready.index(stage), w_ring.index(stage))
        stage = stage + 1
        wrapped = (stage == STAGES).to(gl.int32)
        stage = stage - STAGES * wrapped
        phase = phase ^ wrapped
        if k0 + S >= K:  # the row's last chunk: store its outputs, start the next row at zero
            out = y_ptr + tokens.to(gl.int64)[:, None] * N_OUT + (r * B + outs)[None, :]
            gl.store(out, acc.to(y_ptr.dtype.element_ty), mask=(tokens < M)[:, None])
            acc = gl.zeros((16, B), gl.float32, mma)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))


def decode_config(x: torch.Tensor, values: torch.Tensor) -> dict | None:
    """(S slots a ring stage, STAGES, C_PAD) where the kernel can run on these operands, else None: at most 16
    tokens, 16-bit operands, B = 16 or 32, K a multiple of S, x's boxes and the ring in shared memory."""
    block_rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    if num_tokens > BM.value or x.dtype not in _GL_DTYPES or block not in (16, 32) or values.dtype != x.dtype:
        return None
    slots = 16 if block == 16 else 8  # a [256, B] box: TMA's largest dimension
    if k % slots:
        return None
    chunk, rows = X_CHUNK.value, BM.value
    c_pad = cdiv(in_features // block, chunk) * chunk
    x_bytes = c_pad * rows * block * x.element_size()
    stage_bytes = slots * block * block * values.element_size()
    stages = int(min(8, (SHARED_BYTES - x_bytes) // stage_bytes))
    if stages < 2:
        return None
    return {"S": slots, "STAGES": stages, "C_PAD": c_pad}


def forward_decode(x: torch.Tensor, values: torch.Tensor, col: torch.Tensor, out: torch.Tensor,
                   num_programs: int) -> bool:
    """out [M, N] = x W^T (no bias) where ``decode_config`` allows; False (nothing done) where it does not.
    ``num_programs``: at most this many programs (one an SM: each holds all of x)."""
    config = decode_config(x, values)
    if config is None:
        return False
    block_rows, k, block, _ = values.shape
    dtype = _GL_DTYPES[values.dtype]
    layout = gl.NVMMASharedLayout.get_default_for([config["S"] * block, block], dtype)
    v_desc = TensorDescriptor.from_tensor(values.view(block_rows * k * block, block), [config["S"] * block, block],
                                          layout)
    programs = min(block_rows, num_programs)
    _decode_kernel[(programs,)](
        x, v_desc, col, out, x.shape[0], x.shape[1], out.shape[1], k, block_rows, programs,
        B=block, S=config["S"], STAGES=config["STAGES"], C_PAD=config["C_PAD"], PUBLIC_REINTERPRET=PUBLIC_REINTERPRET,
        num_warps=block // 8,  # one warp per 8 output columns of the [16, B] tile (mma m16n8k16)
    )
    return True
