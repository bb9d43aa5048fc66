"""The forward over groups of G block-rows in Gluon (Hopper): each activation box is brought into shared
memory once by TMA and multiplied by every block-row of the group that has its column.

Why Gluon: the plain-Triton versions of this design (``forward_rows.py``) are slower than the gather
forward, because Triton's pipeliner does not prefetch loads under a data-dependent branch. Here the
pipeline is explicit: a ring of STAGES shared-memory stages, each holding one listed column's
activation box [BM x B] and the group's blocks of that column ([B x B] each, loaded only for the rows
that have it: TMA's predicate), filled STAGES - 1 listings ahead and tracked by one mbarrier a stage.
The multiplies read the box and the blocks straight from shared memory (warpgroup MMA).

The listing is ``row_groups.py``'s: only columns in [0, C) are listed, so nothing outside the operands
is read. Hopper or newer, Triton with ``triton.experimental.gluon`` (3.6+), 16-byte aligned operands,
large token counts; ``dispatch.py`` decides where it runs.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from sparsify.kernels.common import cdiv

GROUP_M = 8  # token tiles per group of the grouped program order (as common.grouped_tile)


@gluon.jit
def _load_listing(x_desc, v_desc, cols_ptr, slots_ptr, listing, m0, row0, K,
                  x_bufs, w_bufs, ready, stage, B: gl.constexpr, G: gl.constexpr):
    """Start the TMA loads of one listed column into ``stage``: its activation box and, for each row of
    the group that has the column, that row's block; the stage's barrier expects exactly those bytes."""
    col = gl.load(cols_ptr + listing)
    present = 0
    for g in gl.static_range(G):
        present += (gl.load(slots_ptr + listing * G + g) >= 0).to(gl.int32)
    bar = ready.index(stage)
    # one arrival with the stage's byte count, which must be a compile-time number: one predicated
    # expect per possible count of present rows, exactly one of them true
    for n in gl.static_range(G + 1):
        mbarrier.expect(bar, x_desc.block_type.nbytes + n * v_desc.block_type.nbytes, pred=present == n)
    tma.async_copy_global_to_shared(x_desc, [m0, col * B], bar, x_bufs.index(stage))
    for g in gl.static_range(G):
        slot = gl.load(slots_ptr + listing * G + g)
        tma.async_copy_global_to_shared(v_desc, [((row0 + g) * K + gl.where(slot >= 0, slot, 0)) * B, 0], bar,
                                        w_bufs.index(stage * G + g), pred=slot >= 0)


@gluon.jit
def _into_row(x_smem, w_smem, slot, acc):
    """acc + box @ block^T where the row has the column (slot >= 0), else acc."""
    if slot >= 0:
        acc = warpgroup_mma(x_smem, w_smem.permute((1, 0)), acc)
    return acc


@gluon.jit
def _store_row(acc, y_desc, c_smem, bias_ptr, m0, row, R, B: gl.constexpr, HAS_BIAS: gl.constexpr,
               layout: gl.constexpr):
    """Block-row ``row``'s output tile (+ bias) through shared memory and a TMA store (which clips the
    token tail); nothing where the group runs past the last block-row."""
    if row < R:
        if HAS_BIAS:
            outs = gl.arange(0, B, layout=gl.SliceLayout(0, layout))
            acc = acc + gl.load(bias_ptr + row * B + outs).to(gl.float32)[None, :]
        tma.store_wait(pendings=0)  # the previous row's store has left c_smem
        c_smem.store(acc.to(y_desc.dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(y_desc, [m0, row * B], c_smem)


@gluon.jit
def _forward_gluon_kernel(
    x_desc, v_desc, y_desc, cols_ptr, slots_ptr, counts_ptr, bias_ptr,
    M, K, R, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
    num_warps: gl.constexpr,
):
    # grouped program order: GROUP_M token tiles visit every row group before the next ones start
    pid = gl.program_id(0)
    num_m = gl.cdiv(M, BM)
    per_group = 8 * NG
    first_m = (pid // per_group) * 8
    group_size = gl.minimum(num_m - first_m, 8)
    pid_m = first_m + (pid % per_group) % group_size
    group = (pid % per_group) // group_size
    m0 = pid_m * BM
    row0 = group * G
    listing0 = group * G * K
    listings = gl.load(counts_ptr + group)

    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BM, B], x_desc.layout)
    w_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES * G, B, B], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)

    for s in gl.static_range(STAGES - 1):  # prologue: the first STAGES - 1 listings in flight
        if s < listings:
            _load_listing(x_desc, v_desc, cols_ptr, slots_ptr, listing0 + s, m0, row0, K,
                          x_bufs, w_bufs, ready, s, B, G)

    acc0 = gl.zeros((BM, B), gl.float32, layout)
    acc1 = gl.zeros((BM, B), gl.float32, layout)
    acc2 = gl.zeros((BM, B), gl.float32, layout)
    acc3 = gl.zeros((BM, B), gl.float32, layout)
    for u in range(0, listings):
        stage = u % STAGES
        mbarrier.wait(ready.index(stage), (u // STAGES) & 1)
        x_smem = x_bufs.index(stage)
        slot_of = slots_ptr + (listing0 + u) * G
        acc0 = _into_row(x_smem, w_bufs.index(stage * G), gl.load(slot_of), acc0)
        if G > 1:
            acc1 = _into_row(x_smem, w_bufs.index(stage * G + 1), gl.load(slot_of + 1), acc1)
        if G > 2:
            acc2 = _into_row(x_smem, w_bufs.index(stage * G + 2), gl.load(slot_of + 2), acc2)
            acc3 = _into_row(x_smem, w_bufs.index(stage * G + 3), gl.load(slot_of + 3), acc3)
        # the multiplies above are complete (synchronous), so the stage read last iteration is free
        ahead = u + STAGES - 1
        if ahead < listings:
            _load_listing(x_desc, v_desc, cols_ptr, slots_ptr, listing0 + ahead, m0, row0, K,
                          x_bufs, w_bufs, ready, ahead % STAGES, B, G)

    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    c_smem = gl.allocate_shared_memory(y_desc.dtype, [BM, B], y_desc.layout)
    _store_row(acc0, y_desc, c_smem, bias_ptr, m0, row0, R, B, HAS_BIAS, layout)
    if G > 1:
        _store_row(acc1, y_desc, c_smem, bias_ptr, m0, row0 + 1, R, B, HAS_BIAS, layout)
    if G > 2:
        _store_row(acc2, y_desc, c_smem, bias_ptr, m0, row0 + 2, R, B, HAS_BIAS, layout)
        _store_row(acc3, y_desc, c_smem, bias_ptr, m0, row0 + 3, R, B, HAS_BIAS, layout)
    tma.store_wait(pendings=0)


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


def forward_gluon(
    x: torch.Tensor,
    values: torch.Tensor,
    groups: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: dict | None = None,
) -> None:
    """y [M, out] (x's dtype, bias added) from x [M, in] and values [R, K, B, B] (bfloat16 / float16,
    16-byte aligned) over ``groups`` (``row_groups.row_groups``; G <= 4). ``config``: {"BM", "STAGES",
    "num_warps"} (default 128, 3, 4)."""
    block_rows, k, block, _ = values.shape
    num_tokens = x.shape[0]
    cols, slots, counts = groups
    num_groups, group = slots.shape[0], slots.shape[2]
    config = {"BM": 128, "STAGES": 3, "num_warps": 4, **(config or {})}
    bm = config["BM"]
    dtype = _GL_DTYPES[x.dtype]
    box = gl.NVMMASharedLayout.get_default_for([bm, block], dtype)
    square = gl.NVMMASharedLayout.get_default_for([block, block], dtype)
    x_desc = TensorDescriptor.from_tensor(x, [bm, block], box)
    v_desc = TensorDescriptor.from_tensor(values.view(block_rows * k * block, block), [block, block], square)
    y_desc = TensorDescriptor.from_tensor(out, [bm, block], box)
    grid = (cdiv(num_tokens, bm) * num_groups,)
    _forward_gluon_kernel[grid](
        x_desc, v_desc, y_desc, cols, slots, counts, bias if bias is not None else out,
        num_tokens, k, block_rows, num_groups,
        B=block, G=group, BM=bm, STAGES=config["STAGES"], HAS_BIAS=bias is not None,
        num_warps=config["num_warps"],
    )

