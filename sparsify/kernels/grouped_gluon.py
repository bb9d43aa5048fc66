"""The forward and grad_input over groups of G output blocks, in Gluon (Hopper): each operand box is
brought into shared memory once by TMA and multiplied into every output block of the group that uses it.

One kernel, two products (``row_groups.py`` lists each one's entries): the forward's groups are G
block-rows, its boxes activation boxes x[:, c] and its blocks W[r, k] used transposed; grad_input's
groups are G block-columns, its boxes grad_out[:, r] and its blocks W[r, k] as they are.

Why Gluon: plain Triton cannot keep a loaded box for later iterations, and its pipeliner does not
prefetch loads under a data-dependent branch (benchmarks/NOTES.md). Here the pipeline is explicit: the
program walks its group's entries through a ring of STAGES shared-memory stages, entry e's block
[B x B] in stage (e - first) % STAGES and each new box [BM x B] in box buffer ``distinct % STAGES``,
one mbarrier a stage counting both (with BOX_BARRIERS the boxes on a ring of barriers of their own;
positions counted, not divided: the loop is issue-bound on the H200). One warpgroup MMA an entry, issued
asynchronously with IN_FLIGHT (F) left running, goes into its output block's accumulator (G of them):
each output element sums its entries in one fixed order, deterministic, no atomics. Entry words are
loaded an iteration before their use.

Why the buffers are free when reloaded: the load of entry n = e + STAGES - F is issued once the MMA of
entry e - F completed (and every earlier one), into the stage entry e - F used; the box it may bring
replaces box number ``distinct[n] - STAGES``, below ``distinct[e - F + 1]`` (at most STAGES - 1 boxes
start after entry e - F + 1 up to n), so only finished entries read it (tests/test_row_groups.py
replays the ring on the host).

Only slots whose column is in [0, C) are entries, so nothing outside the operands is read; TMA
zero-fills the token tail and clips it on the store; an output block without entries is written as
zeros. Hopper, Triton with ``triton.experimental.gluon`` (3.6 and 3.9 compile it), bfloat16 / float16,
16-byte aligned operands; routed only where ``kernel_options(grouped=...)`` asks (not yet faster).
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
def _step(position, by, STAGES: gl.constexpr):
    """A ring position moved on by ``by`` (0 or 1), and 1 where it wrapped (the barrier phase flips).
    Counted, because an entry number % STAGES costs a division a loop where STAGES is no power of two
    (6 stages ran 6-8% slower than 4 or 8 on the H200)."""
    position = position + by
    wrapped = (position == STAGES).to(gl.int32)
    return position - STAGES * wrapped, wrapped


@gluon.jit
def _word(ptr, entry, end):
    """ptr[entry], zero past the group's end (such an entry is never issued). Loaded an iteration before
    its use, so the global load's latency hides behind the running MMA: at G = 4 one program fills an SM."""
    return gl.load(ptr + entry, mask=entry < end, other=0)


@gluon.jit
def _issue_loads(a_desc, v_desc, word, block, stage, slot, m0, a_bufs, w_bufs, ready, box_ready,
                 STAGES: gl.constexpr, B: gl.constexpr, BOX_BARRIERS: gl.constexpr):
    """Start an entry's TMA loads: its block into ring stage ``stage`` (barrier ready[stage]), and its box
    where it starts a new one into box buffer ``slot`` (the number of boxes so far % STAGES, counted by the
    caller). BOX_BARRIERS: the box on a barrier of its own (box_ready[slot]), each barrier with a constant
    byte count; else both on ready[stage], one of two predicated expects true. Why two rings: Triton 3.6's
    shared-memory barrier pass puts a CTA-wide bar.sync between any two operations on one barrier, five an
    entry with one ring, three with two (gluon_compile_check.py counts them)."""
    starts = (word & 1) != 0
    bar = ready.index(stage)
    if BOX_BARRIERS:
        box_bar = box_ready.index(slot)
        mbarrier.expect(box_bar, a_desc.block_type.nbytes, pred=starts)
        mbarrier.expect(bar, v_desc.block_type.nbytes)
        _tma_load(a_desc, [m0, (word >> 1) * B], box_bar, a_bufs.index(slot), pred=starts)
    else:
        mbarrier.expect(bar, v_desc.block_type.nbytes, pred=~starts)
        mbarrier.expect(bar, v_desc.block_type.nbytes + a_desc.block_type.nbytes, pred=starts)
        _tma_load(a_desc, [m0, (word >> 1) * B], bar, a_bufs.index(slot), pred=starts)
    _tma_load(v_desc, [block * B, 0], bar, w_bufs.index(stage))


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
def _mma_entry(a_bufs, w_bufs, target, slot, stage, acc0, acc1, acc2, acc3,
               G: gl.constexpr, TRANSPOSE: gl.constexpr, IN_FLIGHT: gl.constexpr):
    """Issue an entry's MMA (box buffer ``slot``, block in ring stage ``stage``, landed) into accumulator
    ``target``, then wait until at most IN_FLIGHT MMAs run: the MMA IN_FLIGHT entries back (and every
    earlier one) is done when this returns."""
    a_smem = a_bufs.index(slot)
    w_smem = w_bufs.index(stage)
    if TRANSPOSE:
        w_smem = w_smem.permute((1, 0))
    if G == 1:
        acc0 = warpgroup_mma(a_smem, w_smem, acc0, is_async=True)
    elif G == 2:
        # if / else, not two ifs: from two consecutive ifs ptxas 12.8 (Triton 3.6's) let the second MMA
        # read a descriptor the first branch wrote (wrong sums on the H200); gluon_compile_check.py looks
        if target == 0:
            acc0 = warpgroup_mma(a_smem, w_smem, acc0, is_async=True)
        else:
            acc1 = warpgroup_mma(a_smem, w_smem, acc1, is_async=True)
    else:
        if target == 0:
            acc0 = warpgroup_mma(a_smem, w_smem, acc0, is_async=True)
        if target == 1:
            acc1 = warpgroup_mma(a_smem, w_smem, acc1, is_async=True)
        if target == 2:
            acc2 = warpgroup_mma(a_smem, w_smem, acc2, is_async=True)
        if target == 3:
            acc3 = warpgroup_mma(a_smem, w_smem, acc3, is_async=True)
    return _wait_accumulators(IN_FLIGHT, acc0, acc1, acc2, acc3, G)


@gluon.jit
def _consume(a_bufs, w_bufs, ready, box_ready, mma, slot, stage, phase, box_phase, acc0, acc1, acc2, acc3,
             STAGES: gl.constexpr, G: gl.constexpr, TRANSPOSE: gl.constexpr, IN_FLIGHT: gl.constexpr,
             BOX_BARRIERS: gl.constexpr):
    """One entry of the MMA side, from its word: its box buffer counted on (and waited for where the entry
    starts it), its stage waited for, its MMA issued; the ring positions, phases and accumulators come back
    for the next entry."""
    starts = (mma & 1) != 0
    slot, box_wrapped = _step(slot, mma & 1, STAGES)
    box_phase = box_phase ^ box_wrapped
    mbarrier.wait(ready.index(stage), phase)
    if BOX_BARRIERS:
        mbarrier.wait(box_ready.index(slot), box_phase, pred=starts)
    acc0, acc1, acc2, acc3 = _mma_entry(a_bufs, w_bufs, mma >> 1, slot, stage, acc0, acc1, acc2, acc3,
                                        G, TRANSPOSE, IN_FLIGHT)
    stage, wrapped = _step(stage, 1, STAGES)
    return slot, stage, phase ^ wrapped, box_phase, acc0, acc1, acc2, acc3


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
    """The ring: STAGES box buffers [BM x B] and STAGES block buffers [B x B], a barrier each (initialized)."""
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES, BM, B], a_desc.layout)
    w_bufs = gl.allocate_shared_memory(v_desc.dtype, [STAGES, B, B], v_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    box_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(box_ready.index(s), count=1)
    return a_bufs, w_bufs, ready, box_ready


@gluon.jit
def _grouped_kernel(
    a_desc, v_desc, y_desc, loads_ptr, blocks_ptr, mmas_ptr, bounds_ptr, bias_ptr,
    M, NUM_OUT, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, TRANSPOSE: gl.constexpr,
    HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, BOX_BARRIERS: gl.constexpr, num_warps: gl.constexpr,
):
    """y[:, group's G output blocks] = sum over the group's entries of box @ block (block^T where
    TRANSPOSE: the forward), one program per (token tile, group)."""
    m0, group = _program_tile(M, BM, NG)
    first, end = _bounds(bounds_ptr, group)

    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    a_bufs, w_bufs, ready, box_ready = _ring(a_desc, v_desc, BM, B, STAGES)
    fence_async_shared()  # the initialized barriers visible to the TMA unit (the async proxy)
    gl.static_assert(STAGES > IN_FLIGHT)  # at least one stage loads ahead
    AHEAD: gl.constexpr = STAGES - IN_FLIGHT  # loads in flight ahead of the next MMA
    zero = first - first  # the ring positions are loop-carried int32 tensors
    load_stage, load_slot = zero, zero - 1  # where the next load goes; the last box's buffer
    for s in gl.static_range(AHEAD):  # prologue: the first AHEAD entries in flight
        if first + s < end:
            word, block = _word(loads_ptr, first + s, end), _word(blocks_ptr, first + s, end)
            load_slot, _ = _step(load_slot, word & 1, STAGES)
            _issue_loads(a_desc, v_desc, word, block, load_stage, load_slot, m0, a_bufs, w_bufs, ready, box_ready,
                         STAGES, B, BOX_BARRIERS)
            load_stage, _ = _step(load_stage, 1, STAGES)

    acc0, acc1, acc2, acc3 = _zero_accumulators(BM, B, layout)
    mma_stage, mma_phase, mma_slot, box_phase = zero, zero, zero - 1, zero
    # the words of the entry the loop body loads (AHEAD ahead) and of the one it multiplies
    word, block = _word(loads_ptr, first + AHEAD, end), _word(blocks_ptr, first + AHEAD, end)
    mma = _word(mmas_ptr, first, end)
    for entry in range(first, end):
        next_word, next_block = _word(loads_ptr, entry + AHEAD + 1, end), _word(blocks_ptr, entry + AHEAD + 1, end)
        next_mma = _word(mmas_ptr, entry + 1, end)
        mma_slot, mma_stage, mma_phase, box_phase, acc0, acc1, acc2, acc3 = _consume(
            a_bufs, w_bufs, ready, box_ready, mma, mma_slot, mma_stage, mma_phase, box_phase, acc0, acc1, acc2, acc3,
            STAGES, G, TRANSPOSE, IN_FLIGHT, BOX_BARRIERS)
        if entry + AHEAD < end:  # the MMA IN_FLIGHT entries back is done: its stage can be refilled
            load_slot, _ = _step(load_slot, word & 1, STAGES)
            _issue_loads(a_desc, v_desc, word, block, load_stage, load_slot, m0, a_bufs, w_bufs, ready, box_ready,
                         STAGES, B, BOX_BARRIERS)
            load_stage, _ = _step(load_stage, 1, STAGES)
        word, block, mma = next_word, next_block, next_mma
    for s in gl.static_range(STAGES):
        mbarrier.invalidate(ready.index(s))
        mbarrier.invalidate(box_ready.index(s))
    _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, group * G, NUM_OUT, B, G, BM, HAS_BIAS, layout)


@gluon.jit
def _producer(a_desc, v_desc, loads_ptr, blocks_ptr, bounds_ptr, group, m0, a_bufs, w_bufs,
              ready, box_ready, empty, STAGES: gl.constexpr, B: gl.constexpr, BOX_BARRIERS: gl.constexpr):
    """The load warp: every entry's TMA loads, each into a stage the MMA partition has released."""
    first, end = _bounds(bounds_ptr, group)
    stage, phase = first - first, first - first  # loop-carried int32 tensors
    slot = stage - 1
    word, block = _word(loads_ptr, first, end), _word(blocks_ptr, first, end)
    for entry in range(first, end):
        next_word, next_block = _word(loads_ptr, entry + 1, end), _word(blocks_ptr, entry + 1, end)
        if entry - first >= STAGES:  # the stage's previous entry (entry - STAGES) has finished its MMA
            mbarrier.wait(empty.index(stage), phase ^ 1)
        slot, _ = _step(slot, word & 1, STAGES)
        _issue_loads(a_desc, v_desc, word, block, stage, slot, m0, a_bufs, w_bufs, ready, box_ready, STAGES, B,
                     BOX_BARRIERS)
        stage, wrapped = _step(stage, 1, STAGES)
        phase = phase ^ wrapped
        word, block = next_word, next_block


@gluon.jit
def _mma_partition(y_desc, bias_ptr, mmas_ptr, bounds_ptr, group, m0, a_bufs, w_bufs, ready, box_ready, empty,
                   NUM_OUT, B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr,
                   TRANSPOSE: gl.constexpr, HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, BOX_BARRIERS: gl.constexpr,
                   layout: gl.constexpr):
    """The MMA warps: each entry's MMA as its stage lands, releasing the stage of the entry IN_FLIGHT
    back (its MMA done); then the group's output tiles."""
    first, end = _bounds(bounds_ptr, group)
    acc0, acc1, acc2, acc3 = _zero_accumulators(BM, B, layout)
    stage, phase, released = first - first, first - first, first - first  # loop-carried int32 tensors
    slot, box_phase = stage - 1, stage
    mma = _word(mmas_ptr, first, end)
    for entry in range(first, end):
        next_mma = _word(mmas_ptr, entry + 1, end)
        slot, stage, phase, box_phase, acc0, acc1, acc2, acc3 = _consume(
            a_bufs, w_bufs, ready, box_ready, mma, slot, stage, phase, box_phase, acc0, acc1, acc2, acc3,
            STAGES, G, TRANSPOSE, IN_FLIGHT, BOX_BARRIERS)
        if entry - IN_FLIGHT >= first:
            mbarrier.arrive(empty.index(released))
            released, _ = _step(released, 1, STAGES)
        mma = next_mma
    _store_group(acc0, acc1, acc2, acc3, y_desc, bias_ptr, m0, group * G, NUM_OUT, B, G, BM, HAS_BIAS, layout)


# The same parameters as _grouped_kernel: one launcher calls either (KERNELS).
@gluon.jit
def _grouped_ws_kernel(
    a_desc, v_desc, y_desc, loads_ptr, blocks_ptr, mmas_ptr, bounds_ptr, bias_ptr,
    M, NUM_OUT, NG,
    B: gl.constexpr, G: gl.constexpr, BM: gl.constexpr, STAGES: gl.constexpr, TRANSPOSE: gl.constexpr,
    HAS_BIAS: gl.constexpr, IN_FLIGHT: gl.constexpr, BOX_BARRIERS: gl.constexpr, num_warps: gl.constexpr,
):
    """``_grouped_kernel`` with its loads in a warp of their own: the MMA warps never wait on an index
    load or a TMA issue, and the loads run up to STAGES entries ahead of the MMAs."""
    m0, group = _program_tile(M, BM, NG)
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                     instr_shape=[16, B, 16])
    a_bufs, w_bufs, ready, box_ready = _ring(a_desc, v_desc, BM, B, STAGES)
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(empty.index(s), count=1)
    fence_async_shared()  # the initialized barriers visible to the TMA unit (the async proxy)
    gl.warp_specialize([
        (_mma_partition, (y_desc, bias_ptr, mmas_ptr, bounds_ptr, group, m0, a_bufs, w_bufs, ready, box_ready,
                          empty, NUM_OUT, B, G, BM, STAGES, TRANSPOSE, HAS_BIAS, IN_FLIGHT, BOX_BARRIERS, layout)),
        (_producer, (a_desc, v_desc, loads_ptr, blocks_ptr, bounds_ptr, group, m0, a_bufs, w_bufs,
                     ready, box_ready, empty, STAGES, B, BOX_BARRIERS)),
    ], [1], [48])


KERNELS = {False: _grouped_kernel, True: _grouped_ws_kernel}
_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}


# Hopper's shared memory for one program (227 KiB), less a margin for the barriers
_SHARED_BYTES = 232448 - 1024


def _stages_that_fit(block: int, group: int, bm: int, ws: bool, itemsize: int, most: int) -> int:
    """The most ring stages (up to ``most``) that fit beside the G output buffers: the plain kernel's reuse
    the ring's memory; the warp-specialized one's partitions live at once, so there the two add."""
    stage = (bm * block + block * block) * itemsize
    outputs = group * bm * block * itemsize
    for stages in range(most, 1, -1):
        need = stages * stage + outputs if ws else max(stages * stage, outputs)
        if need <= _SHARED_BYTES:
            return stages
    raise ValueError(f"the grouped Gluon kernel does not fit shared memory at B = {block}, G = {group}, BM = {bm}")


def launch_config(block: int, group: int, itemsize: int, config: dict | None = None) -> dict:
    """``config`` with the defaults, the fastest measured on the H200 (benchmarks/NOTES.md): BM 128, 8 warps
    (G = 4's accumulators need two warpgroups); plain: up to 4 stages that fit, one MMA left running; WS: 6, two;
    one barrier ring (BOX_BARRIERS, a ring for the boxes too, compiles to fewer bar.syncs; not yet timed)."""
    if group not in (1, 2, 4):
        raise ValueError(f"the grouped Gluon kernel takes groups of 1, 2 or 4 output blocks, not {group}")
    config = {"BM": 128, "num_warps": 8, "WS": False, "BOX_BARRIERS": False, **(config or {})}
    ws = bool(config["WS"])
    if "STAGES" not in config:
        config["STAGES"] = _stages_that_fit(block, group, config["BM"], ws, itemsize, most=6 if ws else 4)
    config.setdefault("IN_FLIGHT", min(2, config["STAGES"] - 1) if ws else 1)
    if not 1 <= config["IN_FLIGHT"] < config["STAGES"]:
        raise ValueError(f"the grouped Gluon kernel needs 1 <= IN_FLIGHT < STAGES (a stage loading ahead), "
                         f"got IN_FLIGHT {config['IN_FLIGHT']} with STAGES {config['STAGES']}")
    return config


def descriptors(a: torch.Tensor, values: torch.Tensor, out: torch.Tensor, bm: int) -> tuple:
    """The kernels' TMA descriptors: operand boxes [BM x B], blocks [B x B], output tiles [BM x B]."""
    block_rows, k, block, _ = values.shape
    dtype = _GL_DTYPES[a.dtype]
    box = gl.NVMMASharedLayout.get_default_for([bm, block], dtype)
    square = gl.NVMMASharedLayout.get_default_for([block, block], dtype)
    return (TensorDescriptor.from_tensor(a, [bm, block], box),
            TensorDescriptor.from_tensor(values.view(block_rows * k * block, block), [block, block], square),
            TensorDescriptor.from_tensor(out, [bm, block], box))


def _launch(a: torch.Tensor, values: torch.Tensor, entries: Entries, bias, out: torch.Tensor, transpose: bool,
            config: dict | None) -> None:
    block = values.shape[2]
    config = launch_config(block, entries.group, a.element_size(), config)
    bm = config["BM"]
    num_groups = entries.bounds.shape[0]
    grid = (cdiv(a.shape[0], bm) * num_groups,)
    KERNELS[bool(config["WS"])][grid](
        *descriptors(a, values, out, bm), entries.loads, entries.blocks, entries.mmas, entries.bounds,
        bias if bias is not None else out, a.shape[0], out.shape[1] // block, num_groups,
        B=block, G=entries.group, BM=bm, STAGES=config["STAGES"], TRANSPOSE=transpose, HAS_BIAS=bias is not None,
        IN_FLIGHT=config["IN_FLIGHT"], BOX_BARRIERS=bool(config["BOX_BARRIERS"]), num_warps=config["num_warps"],
    )


def forward_grouped(x: torch.Tensor, values: torch.Tensor, entries: Entries, bias: torch.Tensor | None,
                    out: torch.Tensor, config: dict | None = None) -> None:
    """y [M, out] (x's dtype, bias added) from x [M, in] and values [R, K, B, B] (bfloat16 / float16,
    16-byte aligned) over ``row_groups.forward_entries`` (G = 1, 2 or 4). ``config``: {"BM", "STAGES",
    "IN_FLIGHT", "num_warps", "BOX_BARRIERS", "WS"} (True: the loads in a warp of their own, ``_grouped_ws_kernel``);
    what it leaves out, ``launch_config`` fills in."""
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
