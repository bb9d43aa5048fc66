"""The forward and grad_input over groups of G output blocks, in Gluon (Hopper): each operand box is
brought into shared memory once by TMA and multiplied into every output block of the group that uses it.

One kernel, two products (``row_groups.py`` lists each one's entries): the forward's groups are G
block-rows, its boxes activation boxes x[:, c] and its blocks W[r, k] used transposed; grad_input's
groups are G block-columns, its boxes grad_out[:, r] and its blocks W[r, k] as they are.

Why Gluon: plain Triton cannot keep a loaded box for later iterations, and its pipeliner does not
prefetch loads under a data-dependent branch (a static unroll over G rows with branches ran at
0.4-0.7x of the gather forward on the H200, benchmarks/NOTES.md). Here the pipeline is explicit. The
program walks its group's entries through a ring of STAGES shared-memory stages: entry e's block
[B x B] goes to stage e % STAGES, and the entry that starts a new box also brings that box [BM x B]
into box buffer ``distinct % STAGES``; one mbarrier a stage counts both. One warpgroup MMA an entry,
issued asynchronously with IN_FLIGHT of them left running (F below), accumulates into its output
block's accumulator (G of them). Each output element sums its entries in one fixed order:
deterministic, no atomics. The entry indices are loaded an iteration before their use: at G = 4 one
program fills an SM, so nothing else hides the latency of those global loads.

Why the buffers are free when reloaded: the load of entry n = e + STAGES - F is issued once the MMA of
entry e - F completed (and every earlier one), into stage n % STAGES = (e - F) % STAGES; the box it may
bring replaces the one numbered ``distinct[n] - STAGES``, which is below ``distinct[e - F + 1]`` (at
most STAGES - 1 boxes start after entry e - F + 1 up to n), so only finished entries read it.
tests/test_row_groups.py replays this on the host.

Only slots whose column is in [0, C) are entries, so nothing outside the operands is read; TMA
zero-fills the token tail and clips it on the store; an output block without entries is written as
zeros. Hopper or newer, Triton with ``triton.experimental.gluon`` (3.6 and 3.9 compile it),
bfloat16 / float16, 16-byte aligned operands, large token counts; not routed by ``dispatch.py`` yet
(benchmarks/grouped_kernels.py times it).
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
from sparsify.kernels.row_groups import Entries

# Triton 3.9 calls the TMA copies async_load / async_store; 3.6 has only the long names
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
_tma_store = getattr(tma, "async_store", None) or tma.async_copy_shared_to_global


@gluon.jit
def _load_indices(boxes_ptr, blocks_ptr, distinct_ptr, entry, first, end):
    """Entry ``entry``'s box, block, box number and whether it starts a new box (zeros past the group's
    end: such an entry is never issued). Loaded an iteration before their use, so the latency of these
    global loads hides behind the running MMA: with G = 4 one program fills an SM, and nothing else does."""
    live = entry < end
    distinct = gl.load(distinct_ptr + entry, mask=live, other=0)
    previous = gl.load(distinct_ptr + gl.maximum(entry - 1, first), mask=live, other=0)
    starts = (entry == first) | (distinct != previous)
    return gl.load(boxes_ptr + entry, mask=live, other=0), gl.load(blocks_ptr + entry, mask=live, other=0), distinct, starts


@gluon.jit
def _issue_loads(a_desc, v_desc, box, block, distinct, starts, entry, m0, a_bufs, w_bufs, ready,
                 STAGES: gl.constexpr, B: gl.constexpr):
    """Start entry ``entry``'s TMA loads into stage entry % STAGES: its block, and its box where it
    starts a new one."""
    bar = ready.index(entry % STAGES)
    # one arrival with the stage's byte count (a compile-time number): one of the two expects is true
    mbarrier.expect(bar, v_desc.block_type.nbytes, pred=~starts)
    mbarrier.expect(bar, v_desc.block_type.nbytes + a_desc.block_type.nbytes, pred=starts)
    _tma_load(a_desc, [m0, box * B], bar, a_bufs.index(distinct % STAGES), pred=starts)
    _tma_load(v_desc, [block * B, 0], bar, w_bufs.index(entry % STAGES))


@gluon.jit
def _mma_indices(targets_ptr, distinct_ptr, entry, end):
    """Entry ``entry``'s output block and box number (zeros past the end), loaded an iteration ahead."""
    live = entry < end
    return gl.load(targets_ptr + entry, mask=live, other=0), gl.load(distinct_ptr + entry, mask=live, other=0)


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
def _mma_entry(a_bufs, w_bufs, target, distinct, entry, acc0, acc1, acc2, acc3,
               STAGES: gl.constexpr, G: gl.constexpr, TRANSPOSE: gl.constexpr, IN_FLIGHT: gl.constexpr):
    """Issue entry ``entry``'s MMA (its stage has landed) into accumulator ``target``, then wait until
    at most IN_FLIGHT MMAs run: entry - IN_FLIGHT's MMA (and every earlier one) is done when this returns."""
    a_smem = a_bufs.index(distinct % STAGES)
    w_smem = w_bufs.index(entry % STAGES)
    if TRANSPOSE:
        w_smem = w_smem.permute((1, 0))
    if target == 0:
        acc0 = warpgroup_mma(a_smem, w_smem, acc0, is_async=True)
    if G > 1:
        if target == 1:
            acc1 = warpgroup_mma(a_smem, w_smem, acc1, is_async=True)
    if G > 2:
        if target == 2:
            acc2 = warpgroup_mma(a_smem, w_smem, acc2, is_async=True)
        if target == 3:
            acc3 = warpgroup_mma(a_smem, w_smem, acc3, is_async=True)
    return _wait_accumulators(IN_FLIGHT, acc0, acc1, acc2, acc3, G)


@gluon.jit
def _store_block(acc, y_desc, c_smem, bias_ptr, m0, block, NUM_OUT, B: gl.constexpr, HAS_BIAS: gl.constexpr,
                 layout: gl.constexpr):
    """Output block ``block``'s tile (+ bias) through its own shared-memory buffer and a TMA store
    (which clips the token tail); nothing where the group runs past the last block. A buffer each,
    because a TMA store reads shared memory after the issuing thread moves on."""
    if block < NUM_OUT:
        if HAS_BIAS:
            outs = gl.arange(0, B, layout=gl.SliceLayout(0, layout))
            acc = acc + gl.load(bias_ptr + block * B + outs).to(gl.float32)[None, :]
        c_smem.store(acc.to(y_desc.dtype))
        fence_async_shared()
        _tma_store(y_desc, [m0, block * B], c_smem)


@gluon.jit
def _program_tile(M, BM: gl.constexpr, NG):
    """(first token, group) of this program in grouped order (as common.grouped_tile): 8 token tiles
    visit every group in turn, so a panel of the operand stays in L2."""
    pid = gl.program_id(0)
    per_group = 8 * NG
    first_m = (pid // per_group) * 8
    group_size = gl.minimum(gl.cdiv(M, BM) - first_m, 8)
    return (first_m + (pid % per_group) % group_size) * BM, (pid % per_group) // group_size


@gluon.jit
def _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, block0, NUM_OUT, B: gl.constexpr, G: gl.constexpr,
                 BM: gl.constexpr, HAS_BIAS: gl.constexpr, layout: gl.constexpr):
    """Wait for the last MMA, then store the group's G output tiles (the accumulators come back as tensors)."""
    c_bufs = gl.allocate_shared_memory(y_desc.dtype, [G, BM, B], y_desc.layout)
    if G == 1:
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0,))
    elif G == 2:
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
    else:
        acc0, acc1, acc2, acc3 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2, acc3))
    _store_block(acc0, y_desc, c_bufs.index(0), bias_ptr, m0, block0, NUM_OUT, B, HAS_BIAS, layout)
    if G > 1:
        _store_block(acc1, y_desc, c_bufs.index(1), bias_ptr, m0, block0 + 1, NUM_OUT, B, HAS_BIAS, layout)
    if G > 2:
        _store_block(acc2, y_desc, c_bufs.index(2), bias_ptr, m0, block0 + 2, NUM_OUT, B, HAS_BIAS, layout)
        _store_block(acc3, y_desc, c_bufs.index(3), bias_ptr, m0, block0 + 3, NUM_OUT, B, HAS_BIAS, layout)
    tma.store_wait(pendings=0)


@gluon.jit
def _bounds(bounds_ptr, group):
    """The group's entries: [first, end) of the flat entry arrays."""
    return gl.load(bounds_ptr + 2 * group), gl.load(bounds_ptr + 2 * group + 1)


@gluon.jit
def _zero_accumulators(BM: gl.constexpr, B: gl.constexpr, layout: gl.constexpr):
    """Four zero accumulators (the loop carries all four; G of them are used, the rest cost nothing)."""
    zero = gl.zeros((BM, B), gl.float32, layout)
    return warpgroup_mma_init(zero), warpgroup_mma_init(zero), warpgroup_mma_init(zero), warpgroup_mma_init(zero)


@gluon.jit
def _ring(a_desc, v_desc, BM: gl.constexpr, B: gl.constexpr, STAGES: gl.constexpr):
    """The ring: STAGES box buffers [BM x B], STAGES block buffers [B x B], a barrier each stage (initialized)."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, B], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, B, B], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
    return a_bufs, w_bufs, ready


@gluon.jit
def _grouped_kernel(
    a_desc, v_desc, y_desc, boxes_ptr, blocks_ptr, targets_ptr, distinct_ptr, bounds_ptr, bias_ptr,
    M, NUM_OUT, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, TRANSPOSE: gl.constexpr,
    HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, num_warps: gl.constexpr,
):
    """y[:, group's G output blocks] = sum over the group's entries of box @ block (block^T where
    TRANSPOSE: the forward), one program per (token tile, group)."""
    m0, group = _program_tile(M, BM, NG)
    first, end = _bounds(bounds_ptr, group)

    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    a_bufs, w_bufs, ready = _ring(a_desc, v_desc, BM, B, STAGES)
    fence_async_shared()  # the initialized barriers visible to the TMA unit (the async proxy)
    gl.static_assert(STAGES > IN_FLIGHT)  # at least one stage loads ahead
    AHEAD: gl.constexpr = STAGES - IN_FLIGHT  # loads in flight ahead of the next MMA
    for s in gl.static_range(AHEAD):  # prologue: the first AHEAD entries in flight
        if first + s < end:
            box, block, distinct, starts = _load_indices(boxes_ptr, blocks_ptr, distinct_ptr, first + s, first, end)
            _issue_loads(a_desc, v_desc, box, block, distinct, starts, first + s, m0, a_bufs, w_bufs, ready, STAGES, B)

    acc0, acc1, acc2, acc3 = _zero_accumulators(BM, B, layout)
    # the indices of the entry the loop body loads (AHEAD ahead) and of the one it multiplies
    box, block, distinct, starts = _load_indices(boxes_ptr, blocks_ptr, distinct_ptr, first + AHEAD, first, end)
    target, mma_distinct = _mma_indices(targets_ptr, distinct_ptr, first, end)
    for entry in range(first, end):
        next_box, next_block, next_distinct, next_starts = _load_indices(
            boxes_ptr, blocks_ptr, distinct_ptr, entry + AHEAD + 1, first, end)
        next_target, next_mma_distinct = _mma_indices(targets_ptr, distinct_ptr, entry + 1, end)
        mbarrier.wait(ready.index(entry % STAGES), ((entry - first) // STAGES) & 1)
        acc0, acc1, acc2, acc3 = _mma_entry(a_bufs, w_bufs, target, mma_distinct, entry,
                                            acc0, acc1, acc2, acc3, STAGES, G, TRANSPOSE, IN_FLIGHT)
        if entry + AHEAD < end:  # entry - IN_FLIGHT's MMA is done: its stage can be refilled
            _issue_loads(a_desc, v_desc, box, block, distinct, starts, entry + AHEAD, m0,
                         a_bufs, w_bufs, ready, STAGES, B)
        box, block, distinct, starts = next_box, next_block, next_distinct, next_starts
        target, mma_distinct = next_target, next_mma_distinct
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
    _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, group * G, NUM_OUT, B, G, BM, HAS_BIAS, layout)


@gluon.jit
def _producer(a_desc, v_desc, boxes_ptr, blocks_ptr, distinct_ptr, bounds_ptr, group, m0, a_bufs, w_bufs,
              ready, empty, STAGES: gl.constexpr, B: gl.constexpr):
    """The load warp: every entry's TMA loads, each into a stage the MMA partition has released."""
    first, end = _bounds(bounds_ptr, group)
    box, block, distinct, starts = _load_indices(boxes_ptr, blocks_ptr, distinct_ptr, first, first, end)
    for entry in range(first, end):
        next_box, next_block, next_distinct, next_starts = _load_indices(
            boxes_ptr, blocks_ptr, distinct_ptr, entry + 1, first, end)
        use = (entry - first) // STAGES
        if use > 0:  # the stage's previous entry (entry - STAGES) has finished its MMA
            mbarrier.wait(empty.index(entry % STAGES), (use - 1) & 1)
        _issue_loads(a_desc, v_desc, box, block, distinct, starts, entry, m0, a_bufs, w_bufs, ready, STAGES, B)
        box, block, distinct, starts = next_box, next_block, next_distinct, next_starts


@gluon.jit
def _mma_partition(y_desc, bias_ptr, targets_ptr, distinct_ptr, bounds_ptr, group, m0, a_bufs, w_bufs, ready, empty,
                   NUM_OUT, B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                   TRANSPOSE: gl.constexpr, HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, layout: gl.constexpr):
    """The MMA warps: each entry's MMA as its stage lands, releasing the stage of entry - IN_FLIGHT (its
    MMA done); then the group's output tiles."""
    first, end = _bounds(bounds_ptr, group)
    acc0, acc1, acc2, acc3 = _zero_accumulators(BM, B, layout)
    target, distinct = _mma_indices(targets_ptr, distinct_ptr, first, end)
    for entry in range(first, end):
        next_target, next_distinct = _mma_indices(targets_ptr, distinct_ptr, entry + 1, end)
        mbarrier.wait(ready.index(entry % STAGES), ((entry - first) // STAGES) & 1)
        acc0, acc1, acc2, acc3 = _mma_entry(a_bufs, w_bufs, target, distinct, entry,
                                            acc0, acc1, acc2, acc3, STAGES, G, TRANSPOSE, IN_FLIGHT)
        if entry - IN_FLIGHT >= first:
            mbarrier.arrive(empty.index((entry - IN_FLIGHT) % STAGES))
        target, distinct = next_target, next_distinct
    _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, group * G, NUM_OUT, B, G, BM, HAS_BIAS, layout)


# The same parameters as _grouped_kernel: one launcher calls either (KERNELS).
@gluon.jit
def _grouped_ws_kernel(
    a_desc, v_desc, y_desc, boxes_ptr, blocks_ptr, targets_ptr, distinct_ptr, bounds_ptr, bias_ptr,
    M, NUM_OUT, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, TRANSPOSE: gl.constexpr,
    HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, num_warps: gl.constexpr,
):
    """``_grouped_kernel`` with its loads in a warp of their own: the MMA warps never wait on an index
    load or a TMA issue, and the loads run up to STAGES entries ahead of the MMAs."""
    m0, group = _program_tile(M, BM, NG)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    a_bufs, w_bufs, ready = _ring(a_desc, v_desc, BM, B, STAGES)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the initialized barriers visible to the TMA unit (the async proxy)
    gl.warp_specialize([
        (_mma_partition, (y_desc, bias_ptr, targets_ptr, distinct_ptr, bounds_ptr, group, m0, a_bufs, w_bufs, ready,
                          empty, NUM_OUT, B, G, BM, STAGES, TRANSPOSE, HAS_BIAS, IN_FLIGHT, layout)),
        (_producer, (a_desc, v_desc, boxes_ptr, blocks_ptr, distinct_ptr, bounds_ptr, group, m0, a_bufs, w_bufs,
                     ready, empty, STAGES, B)),
    ], [1], [48])


KERNELS = {False: _grouped_kernel, True: _grouped_ws_kernel}
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


# Hopper's shared memory for one program (227 KiB), less a margin for the barriers
_SHARED_BYTES = 232448 - 1024


def _stages_that_fit(block: int, group: int, bm: int, ws: bool, itemsize: int, most: int) -> int:
    """The most ring stages (up to ``most``) that fit beside the G output buffers. The plain kernel's
    output buffers reuse the ring's memory (the compiler overlaps allocations whose lives do not
    overlap: B = 128, G = 2 took 256 KiB + 32 bytes at 4 stages); the warp-specialized one's
    partitions live at once, so there the two add (B = 128, G = 2, 4 stages: 320 KiB)."""
    stage = (bm * block + block * block) * itemsize
    outputs = group * bm * block * itemsize
    for stages in range(most, 1, -1):
        need = stages * stage + outputs if ws else max(stages * stage, outputs)
        if need <= _SHARED_BYTES:
            return stages
    raise ValueError(f"the grouped Gluon kernel does not fit shared memory at B = {block}, G = {group}, BM = {bm}")


def _launch(a: torch.Tensor, values: torch.Tensor, entries: Entries, bias, out: torch.Tensor, transpose: bool,
            config: dict | None) -> None:
    block_rows, k, block, _ = values.shape
    if entries.group not in (1, 2, 4):
        raise ValueError(f"the grouped Gluon kernel takes groups of 1, 2 or 4 output blocks, not {entries.group}")
    config = {"BM": 128, "num_warps": 8, "WS": False, **(config or {})}
    bm = config["BM"]
    ws = bool(config["WS"])
    if "STAGES" not in config:  # measured on the H200 (benchmarks/NOTES.md, "Gluon v2")
        config["STAGES"] = _stages_that_fit(block, entries.group, bm, ws, a.element_size(), most=6 if ws else 4)
    config.setdefault("IN_FLIGHT", min(2, config["STAGES"] - 1) if ws else 1)
    if not 1 <= config["IN_FLIGHT"] < config["STAGES"]:
        raise ValueError(f"the grouped Gluon kernel needs 1 <= IN_FLIGHT < STAGES (a stage loading ahead), "
                         f"got IN_FLIGHT {config['IN_FLIGHT']} with STAGES {config['STAGES']}")
    dtype = _GL_DTYPES[a.dtype]
    box = gl.NVMMASharedLayout.get_default_for([bm, block], dtype)
    square = gl.NVMMASharedLayout.get_default_for([block, block], dtype)
    a_desc = TensorDescriptor.from_tensor(a, [bm, block], box)
    v_desc = TensorDescriptor.from_tensor(values.view(block_rows * k * block, block), [block, block], square)
    y_desc = TensorDescriptor.from_tensor(out, [bm, block], box)
    num_groups = entries.bounds.shape[0]
    grid = (cdiv(a.shape[0], bm) * num_groups,)
    KERNELS[bool(config["WS"])][grid](
        a_desc, v_desc, y_desc, entries.boxes, entries.blocks, entries.targets, entries.distinct, entries.bounds,
        bias if bias is not None else out, a.shape[0], out.shape[1] // block, num_groups,
        B=block, G=entries.group, BM=bm, STAGES=config["STAGES"], TRANSPOSE=transpose, HAS_BIAS=bias is not None,
        IN_FLIGHT=config["IN_FLIGHT"], num_warps=config["num_warps"],
    )


def forward_grouped(x: torch.Tensor, values: torch.Tensor, entries: Entries, bias: torch.Tensor | None,
                    out: torch.Tensor, config: dict | None = None) -> None:
    """y [M, out] (x's dtype, bias added) from x [M, in] and values [R, K, B, B] (bfloat16 / float16,
    16-byte aligned) over ``row_groups.forward_entries`` (G = 1, 2 or 4). ``config``: {"BM", "STAGES",
    "IN_FLIGHT", "num_warps", "WS"} (defaults, the fastest measured: BM 128; plain: the most stages up to 4
    that fit shared memory and one MMA left running after each issue (at G = 4, 6 stages ran 8% slower
    and 8 as fast as 4, likely the loop's index arithmetic: % 6 divides where % 4 and % 8 mask; two or
    three left running changed nothing); warp-specialized: up to 6 stages, two left running; 8 warps: the accumulators of G = 4 need two warpgroups' registers, and
    WS False; True: the loads in a warp of their own, ``_grouped_ws_kernel``)."""
    if entries.bounds.shape[0] != -(-values.shape[0] // entries.group):
        raise ValueError(f"forward entries for {entries.bounds.shape[0]} groups of {entries.group} block-rows "
                         f"do not match {values.shape[0]} block-rows")
    _launch(x, values, entries, bias, out, True, config)


def grad_input_grouped(grad_out: torch.Tensor, values: torch.Tensor, entries: Entries, out: torch.Tensor,
                       config: dict | None = None) -> None:
    """grad_x [M, in] = grad_out [M, out] W over ``row_groups.grad_input_entries`` (G = 1, 2 or 4), as
    ``forward_grouped``; a block-column that no slot reads is written as zeros."""
    num_cols = out.shape[1] // values.shape[2]
    if entries.bounds.shape[0] != -(-num_cols // entries.group):
        raise ValueError(f"grad_input entries for {entries.bounds.shape[0]} groups of {entries.group} block-columns "
                         f"do not match {num_cols} block-columns")
    _launch(grad_out, values, entries, None, out, False, config)
