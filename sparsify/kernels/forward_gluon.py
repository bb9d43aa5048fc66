"""The forward over groups of G block-rows in Gluon (Hopper): each activation box is brought into shared
memory once by TMA and multiplied by every block-row of the group that has its column.

Why Gluon: plain Triton cannot keep a loaded box for later iterations, and its pipeliner does not
prefetch loads under a data-dependent branch (a static unroll over G rows with branches ran at
0.4-0.7x of the gather forward on the H200, benchmarks/NOTES.md). Here the pipeline is explicit. The
program walks its group's entries (``row_groups.group_entries``: every slot of its rows, by column)
through a ring of STAGES shared-memory stages: entry e's block [B x B] goes to stage e % STAGES, and
the entry that starts a new column also brings its activation box [BM x B] into box buffer
``distinct % STAGES``; one mbarrier a stage counts both. One warpgroup MMA an entry, issued
asynchronously with one left in flight, accumulates into its row's accumulator (G of them).

Why the buffers are free when reloaded: the load of entry e + STAGES - 1 is issued after the MMA of
entry e - 1 completed, into stage (e - 1) % STAGES; the box it may bring replaces the one of column
``distinct[e + STAGES - 1] - STAGES``, at most ``distinct[e - 1]``: no entry from e on reads it unless
it is ``distinct[e - 1]``, which only happens when all of the STAGES entries e .. e + STAGES - 1 start
new columns, and then entry e's column differs from entry e - 1's.

Only columns in [0, C) are entries, so nothing outside the operands is read; TMA zero-fills the
token tail and clips it on the store. Hopper or newer, Triton with ``triton.experimental.gluon``
(3.6+), bfloat16 / float16, 16-byte aligned operands, large token counts; not routed by
``dispatch.py`` yet (benchmarks/forward_designs.py times it).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared, mbarrier, tma, warpgroup_mma, warpgroup_mma_init, warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparsify.kernels.common import cdiv

# Triton 3.9 calls the TMA copies async_load / async_store; 3.6 has only the long names
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _load_entry(x_desc, v_desc, cols_ptr, row_slots_ptr, distinct_ptr, entry, first, m0, block0,
                x_bufs, w_bufs, ready, STAGES: gl.constexpr, B: gl.constexpr):
    """Start entry ``entry``'s TMA loads into stage entry % STAGES: its block, and its column's
    activation box where it starts a new column (``first``: the group's first entry)."""
    distinct = gl.load(distinct_ptr + entry)
    starts = (entry == first) | (distinct != gl.load(distinct_ptr + gl.maximum(entry - 1, first)))
    bar = ready.index(entry % STAGES)
    # one arrival with the stage's byte count (a compile-time number): one of the two expects is true
    mbarrier.expect(bar, v_desc.block_type.nbytes, pred=~starts)
    mbarrier.expect(bar, v_desc.block_type.nbytes + x_desc.block_type.nbytes, pred=starts)
    _tma_load(x_desc, [m0, gl.load(cols_ptr + entry) * B], bar,
                                    x_bufs.index(distinct % STAGES), pred=starts)
    _tma_load(v_desc, [(block0 + gl.load(row_slots_ptr + entry)) * B, 0], bar,
                                    w_bufs.index(entry % STAGES))


@gluon.jit
def _wait_accumulators(outstanding: gl.constexpr, acc0, acc1, acc2, acc3, G: gl.constexpr):
    """Wait until at most ``outstanding`` MMAs run; the G accumulators in use come back as MMA
    accumulators (the type the loop carries), the unused ones untouched."""
    if G == 1:
        acc0 = warpgroup_mma_init(warpgroup_mma_wait(num_outstanding=outstanding, deps=(acc0,)))
    elif G == 2:
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=outstanding, deps=(acc0, acc1))
        acc0 = warpgroup_mma_init(acc0)
        acc1 = warpgroup_mma_init(acc1)
    else:
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=outstanding, deps=(acc0, acc1, acc2, acc3))
        acc0 = warpgroup_mma_init(acc0)
        acc1 = warpgroup_mma_init(acc1)
        acc2 = warpgroup_mma_init(acc2)
        acc3 = warpgroup_mma_init(acc3)
    return acc0, acc1, acc2, acc3


@gluon.jit
def _store_row(acc, y_desc, c_smem, bias_ptr, m0, row, R, B: gl.constexpr, HAS_BIAS: gl.constexpr,
               layout: gl.constexpr):
    """Block-row ``row``'s output tile (+ bias) through its own shared-memory buffer and a TMA store
    (which clips the token tail); nothing where the group runs past the last block-row. A buffer
    each, because a TMA store reads shared memory after the issuing thread moves on."""
    if row < R:
        if HAS_BIAS:
            outs = gl.arange(0, B, layout=gl.SliceLayout(0, layout))
            acc = acc + gl.load(bias_ptr + row * B + outs).to(gl.float32)[None, :]
        c_smem.store(acc.to(y_desc.dtype))
        fence_async_shared()
        _tma_store(y_desc, [m0, row * B], c_smem)


@gluon.jit
def _program_tile(M, BM: gl.constexpr, NG):
    """(first token, row group) of this program in grouped order (as common.grouped_tile): 8 token
    tiles visit every row group in turn, so an activation panel stays in L2."""
    pid = gl.program_id(0)
    per_group = 8 * NG
    first_m = (pid // per_group) * 8
    group_size = gl.minimum(gl.cdiv(M, BM) - first_m, 8)
    return (first_m + (pid % per_group) % group_size) * BM, (pid % per_group) // group_size


@gluon.jit
def _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, row0, R, B: gl.constexpr, G: gl.constexpr,
                 BM: gl.constexpr, HAS_BIAS: gl.constexpr, layout: gl.constexpr):
    """Wait for the last MMA, then store the G rows' output tiles (the accumulators come back as tensors)."""
    c_bufs = gl.allocate_shared_memory(y_desc.dtype, [G, BM, B], y_desc.layout)
    if G == 1:
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0,))
    elif G == 2:
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
    else:
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
    _store_row(acc0, y_desc, c_bufs.index(0), bias_ptr, m0, row0, R, B, HAS_BIAS, layout)
    if G > 1:
        _store_row(acc1, y_desc, c_bufs.index(1), bias_ptr, m0, row0 + 1, R, B, HAS_BIAS, layout)
    if G > 2:
        _store_row(acc2, y_desc, c_bufs.index(2), bias_ptr, m0, row0 + 2, R, B, HAS_BIAS, layout)
        _store_row(acc3, y_desc, c_bufs.index(3), bias_ptr, m0, row0 + 3, R, B, HAS_BIAS, layout)
    tma.store_wait(pendings=0)


@gluon.jit
def _forward_gluon_kernel(
    x_desc, v_desc, y_desc, cols_ptr, row_slots_ptr, distinct_ptr, counts_ptr, bias_ptr,
    M, K, R, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    num_warps: gl.constexpr,
):
    m0, group = _program_tile(M, BM, NG)
    row0 = group * G
    block0 = row0 * K  # entry (g, k) is block (row0 + g) * K + k = block0 + g*K + k of values
    first = group * G * K
    end = first + gl.load(counts_ptr + group)

    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, B], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, B, B], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    for s in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 entries in flight
        if first + s < end:
            _load_entry(x_desc, v_desc, cols_ptr, row_slots_ptr, distinct_ptr, first + s, first, m0, block0,
                        x_bufs, w_bufs, ready, STAGES, B)

    acc0 = warpgroup_mma_init(gl.zeros((BM, B), gl.float32, layout))
    acc1 = warpgroup_mma_init(gl.zeros((BM, B), gl.float32, layout))
    acc2 = warpgroup_mma_init(gl.zeros((BM, B), gl.float32, layout))
    acc3 = warpgroup_mma_init(gl.zeros((BM, B), gl.float32, layout))
    for entry in range(first, end):
        u = entry - first
        mbarrier.wait(ready.index(entry % STAGES), (u // STAGES) & 1)
        row = gl.load(row_slots_ptr + entry) // K
        x_smem = x_bufs.index(gl.load(distinct_ptr + entry) % STAGES)
        w_smem = w_bufs.index(entry % STAGES).permute((1, 0))
        if row == 0:
            acc0 = warpgroup_mma(x_smem, w_smem, acc0, is_async=True)
        if G > 1:
            if row == 1:
                acc1 = warpgroup_mma(x_smem, w_smem, acc1, is_async=True)
        if G > 2:
            if row == 2:
                acc2 = warpgroup_mma(x_smem, w_smem, acc2, is_async=True)
            if row == 3:
                acc3 = warpgroup_mma(x_smem, w_smem, acc3, is_async=True)
        # at most this entry's MMA still runs: the previous entry's stage can be refilled
        acc0, acc1, acc2, acc3 = _wait_accumulators(1, acc0, acc1, acc2, acc3, G)
        if entry + STAGES - 1 < end:
            _load_entry(x_desc, v_desc, cols_ptr, row_slots_ptr, distinct_ptr, entry + STAGES - 1, first, m0,
                        block0, x_bufs, w_bufs, ready, STAGES, B)
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, row0, R, B, G, BM, HAS_BIAS, layout)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def forward_gluon(
    x: torch.Tensor,
    values: torch.Tensor,
    entries: tuple[torch.Tensor, ...],
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
) -> None:
    """y [M, out] (x's dtype, bias added) from x [M, in] and values [R, K, B, B] (bfloat16 / float16,
    16-byte aligned) over ``entries`` (``row_groups.group_entries`` with G = 1, 2 or 4). ``config``:
    {"BM", "STAGES", "num_warps"} (default 128, 4, and 8 warps: the accumulators of G = 4 need two
    warpgroups' registers)."""
    block_rows, k, block, _ = values.shape
    num_tokens = x.shape[0]
    cols, row_slots, distinct, counts = entries
    num_groups = counts.shape[0]
    group = cols.shape[1] // k
    if group not in (1, 2, 4) or cols.shape[1] != group * k or num_groups != -(-block_rows // group):
        raise ValueError(f"entries for groups of 1, 2 or 4 block-rows with {k} slots each expected, got "
                         f"{num_groups} groups of {cols.shape[1]} entries for {block_rows} block-rows")
    config = {"BM": 128, "STAGES": 4, "num_warps": 8, **(config or {})}
    bm = config["BM"]
    dtype = _GL_DTYPES[x.dtype]
    box = gl.NVMMASharedLayout.get_default_for([bm, block], dtype)
    square = gl.NVMMASharedLayout.get_default_for([block, block], dtype)
    x_desc = TensorDescriptor.from_tensor(x, [bm, block], box)
    v_desc = TensorDescriptor.from_tensor(values.view(block_rows * k * block, block), [block, block], square)
    y_desc = TensorDescriptor.from_tensor(out, [bm, block], box)
    grid = (cdiv(num_tokens, bm) * num_groups,)
    _forward_gluon_kernel[grid](
        x_desc, v_desc, y_desc, cols, row_slots, distinct, counts, bias if bias is not None else out,
        num_tokens, k, block_rows, num_groups,
        B=block, G=group, BM=bm, STAGES=config["STAGES"], HAS_BIAS=bias is not None,
        num_warps=config["num_warps"],
    )
