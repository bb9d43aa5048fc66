"""Which kernel runs, and why: the one room that decides.

First the routing rules (backend, kernel variant, split counts), each reading the kernel options
(``options.py``: the switches, their environment variables, the context manager; re-exported here),
then the Triton launchers the ops call, which apply them: each kernel file launches one kernel, this
file picks it.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

from sparsify.kernels.dense_weight import forward_dense, grad_input_dense, grad_values_dense
from sparsify.kernels.options import (  # noqa: F401  (re-exported: the public names live here too)
    BACKENDS, BLOCK_KERNELS, GROUPED_CHOICES, SPLIT_REDUCE_CHOICES, TMA_CHOICES, KernelOptions, interpreting,
    kernel_options, options, set_kernel_options,
)


# ---------------------------------------------------------------------------------------------------
# Routing rules: which backend, which kernel variant, how many programs share one reduction.


@functools.cache
def _launchers() -> SimpleNamespace:
    """Every Triton kernel's launcher (imported on first use: this file stands on torch alone)."""
    from sparsify.kernels import column_check, column_view, forward, forward_tma, grad_input, grad_values, tiles
    from sparsify.kernels import grad_input_tma, grad_values_tma
    from sparsify.kernels.common import reduce_partials
    from sparsify.kernels.split_counters import split_counters
    from sparsify.kernels.topology_cache import per_topology

    return SimpleNamespace(
        # metadata of the topology: built once per state of col_indices (topology_cache.py says when)
        check_columns=per_topology("columns checked", column_check.check_columns, reuse_under_capture=True),
        column_view=per_topology("column view", column_view.column_view),
        slot_table=per_topology("slot table", tiles.slot_table),
        forward_gather=forward.forward_gather, forward_tma=forward_tma.forward_tma,
        tile_matmul=tiles.tile_matmul, densify=tiles.densify, blocks_of=tiles.blocks_of,
        grad_input_columns=grad_input.grad_input_columns,
        grad_input_tma=grad_input_tma.grad_input_tma_columns, grad_values_tma=grad_values_tma.grad_values_tma,
        grad_values_gather=grad_values.grad_values_gather, grad_values_tiles=grad_values.grad_values_tiles,
        reduce_partials=reduce_partials, split_counters=split_counters,
    )


@functools.cache
def triton_kernels() -> SimpleNamespace | None:
    """The Triton launchers the ops call (forward, grad_input, grad_values: the reference's signatures,
    defined at the end of this file), or None where Triton cannot be imported."""
    try:
        _launchers()
    except ImportError:
        return None
    return SimpleNamespace(forward=triton_forward, grad_input=triton_grad_input, grad_values=triton_grad_values)


def backend_for(device: torch.device) -> str:
    """The backend ("reference" or "triton") that runs on ``device`` under the options in force."""
    choice = options().backend
    if choice == "reference":
        return "reference"
    if choice == "auto":
        return "triton" if device.type == "cuda" and triton_kernels() is not None else "reference"
    if triton_kernels() is None:
        raise RuntimeError("kernel option backend='triton' but the Triton kernels cannot be imported; install triton")
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"kernel option backend='triton' with {device.type} tensors needs Triton's CPU interpreter: start "
            "Python with TRITON_INTERPRET=1 (it is read when triton is imported), or use backend='auto' "
            "(the PyTorch reference off CUDA)"
        )
    return "triton"


def kernels_for(device: torch.device):
    """The launchers (forward, grad_input, grad_values) that run on ``device``."""
    if backend_for(device) == "triton":
        return triton_kernels()
    from sparsify.kernels import reference

    return reference


# Which kernel serves large token counts for small blocks: "gather" (boxes per slot) or "tile"
# (masked-dense tiles; kernel option block_kernel overrides, the benchmarks compare both).
# Masked-dense tiles do the dense FLOPs whatever the density, so they win where gathering is slower
# than that. Measured on the H100 (4096<->14336, M = 8192, benchmarks/NOTES.md): gathering at B = 16 was
# slower than the tiles from density 0.25 up (3.1 vs ~2.4 ms), at B = 32 faster at 0.25 (1.1 vs ~2.2 ms),
# even at 0.5 and slower at 0.75. On the H200 (2026-12-01, d = 0.5, M = 8192, the variant columns of
# results/NVIDIA_H200-2026-12-01-layers.json) the B = 32 forward gathers faster on every shape (4096->14336
# 1.84 vs 2.27 ms, 14336->4096 2.05 vs 2.27, 640->2560 0.076 vs 0.093, 2560->640 0.070 vs 0.188) while the
# tiles stay faster for the backward (fwd+bwd minus fwd 3.7 vs 4.8 ms); at B = 16 the tiles win both.
# Key: product -> block size -> the lowest density that takes the tiles.
TILE_MIN_DENSITY = {"forward": {16: 0.15, 32: 0.75}, "backward": {16: 0.15, 32: 0.5}}
TILE_MIN_TOKENS = 256


def use_tiles(block: int, density: float, num_tokens: int, product: str = "forward") -> bool:
    """Masked-dense tiles instead of the gather kernels for ``product``: "forward", or "backward"
    (grad_input and grad_values)."""
    choice = options().block_kernel
    if choice == "tile":
        return True
    thresholds = TILE_MIN_DENSITY[product]
    if choice in ("gather", "dense") or num_tokens < TILE_MIN_TOKENS or block not in thresholds:
        return False
    return density >= thresholds[block]


# The dense weight materialised for the call and cuBLAS (dense_weight.py) instead of every per-block kernel:
# it does the dense FLOPs at cuBLAS's rate plus one pass over a dense-size buffer (~0.05 ms at 4096 x 14336
# bf16 against a 1.2 ms GEMM at 8192 tokens), where the masked-dense tiles ran at 0.49-0.64x dense and the
# B = 32 kernels at 0.63-0.74x (H200, 2026-12-02, results/NVIDIA_H200-2026-12-02.json). Predicted from
# those, not yet timed on a GPU: the thresholds are where the per-block kernels' time (proportional to
# density) crosses dense's, from the measured 0.5 points. Key: product -> block size -> lowest density.
DENSE_MIN_DENSITY = {"forward": {16: 0.15, 32: 0.4}, "backward": {16: 0.15, 32: 0.4}}
DENSE_MIN_TOKENS = 2048  # below, the buffer's pass costs more than the tiles lose


def use_dense_weight(block: int, density: float, num_tokens: int, product: str = "forward") -> bool:
    """The dense-weight path for ``product`` ("forward", or "backward": grad_input and grad_values); kernel
    option block_kernel="dense" takes it at every block size."""
    choice = options().block_kernel
    if choice in ("gather", "tile"):
        return False
    if choice == "dense":
        return True
    thresholds = DENSE_MIN_DENSITY[product]
    return num_tokens >= DENSE_MIN_TOKENS and block in thresholds and density >= thresholds[block]


# The tensor-descriptor kernels from this block size up, per product: measured on the H200 (2026-12-01,
# 4096<->14336, M = 8192, benchmarks/NOTES.md): forward faster at B = 64 and 128, grad_input at 64 and 128,
# grad_values at 128 (at 64 faster on one shape, slower on the other).
TMA_MIN_BLOCK = {"forward": 64, "grad_input": 64, "grad_values": 128}
TMA_MIN_TOKENS = 256


def use_tma(a: torch.Tensor, b: torch.Tensor, num_tokens: int, product: str = "forward",
            block: int | None = None) -> bool:
    """The TMA kernel of ``product`` for large blocks and many tokens on Hopper or newer, operands a and b
    (x / grad_out and values or x; ``block`` defaults to values' block size); option tma="on" takes
    every TMA kernel from B = 64, "off" none."""
    choice = options().tma
    if choice == "off" or a.device.type != "cuda" or interpreting() or num_tokens < TMA_MIN_TOKENS:
        return False
    if _capability_major(_index(a.device)) < 9:
        return False
    if any(t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16 for t in (a, b)):
        return False  # tensor descriptors need 16-byte aligned bases and row strides
    return (b.shape[2] if block is None else block) >= (64 if choice == "on" else TMA_MIN_BLOCK[product])


# The grouped Gluon kernels (grouped_gluon.py): (G output blocks a program owns, launch config) by block
# size. GROUPED_DESIGNS: the fastest measured on the H200 (4096 <-> 14336, 8192 tokens, benchmarks/NOTES.md),
# where they beat today's kernels (B = 64: 0.96 / 0.91 ms vs 1.13 / 1.19 for the forward / grad_input;
# B = 32: 1.69 / 1.71 vs 1.89 / 2.05); option grouped="auto" routes only these. "on" / "ws" route every
# block size, GROUP_SIZE's G where no design was measured faster (B = 16, 128: slower than today's).
GROUPED_DESIGNS = {64: (2, {"BM": 256}), 32: (2, {"BM": 256})}
GROUP_SIZE = {16: 4, 128: 2}
# Measured faster on 4096 <-> 14336 at 8192 tokens (2.4e11 multiply-adds); on 640 <-> 2560 (6.7e9) an eager call
# is bound by host time (the descriptors and the Gluon launch cost more than today's launch), so below this
# (~80 us of tensor work) "auto" keeps today's kernels.
GROUPED_MIN_WORK = 2**35


@functools.cache
def _grouped_launchers() -> SimpleNamespace | None:
    """The grouped Gluon launchers and their per-topology entries, or None where this Triton has no Gluon."""
    try:
        from sparsify.kernels import grouped_gluon
    except ImportError:
        return None
    from sparsify.kernels.row_groups import forward_entries, grad_input_entries
    from sparsify.kernels.topology_cache import per_topology

    def entries(kind, build):  # one cache entry per group size
        sizes = set(GROUP_SIZE.values()) | {g for g, _ in GROUPED_DESIGNS.values()}
        return {g: per_topology(f"{kind} G={g}", lambda col, n, g=g: build(col, n, g)) for g in sizes}

    return SimpleNamespace(forward=grouped_gluon.forward_grouped, grad_input=grouped_gluon.grad_input_grouped,
                           forward_entries=entries("forward entries", forward_entries),
                           grad_input_entries=entries("grad_input entries", grad_input_entries))


def grouped_design(block: int, choice: str) -> tuple[int, dict] | None:
    """(G, launch config) of the grouped kernels for option value ``choice`` at block size ``block``, or None."""
    if choice == "off" or (choice == "auto" and block not in GROUPED_DESIGNS):
        return None
    group, config = GROUPED_DESIGNS[block] if block in GROUPED_DESIGNS else (GROUP_SIZE[block], {})
    return group, {**config, "WS": choice == "ws"}


def use_grouped(tensors: tuple, num_tokens: int) -> tuple[int, dict] | None:
    """(G, launch config) of the grouped Gluon kernels where kernel option grouped asks for them and they can
    run on ``tensors`` (operand, values, output: CUDA on Hopper or newer, bfloat16 / float16, 16-byte aligned,
    many tokens, a Triton with Gluon), else None. "auto" takes them only for products of at least
    GROUPED_MIN_WORK multiply-adds."""
    a, values = tensors[0], tensors[1]
    design = grouped_design(values.shape[2], options().grouped)
    if design is None or a.device.type != "cuda" or interpreting() or num_tokens < TMA_MIN_TOKENS:
        return None
    if a.dtype not in (torch.bfloat16, torch.float16) or _capability_major(_index(a.device)) < 9:
        return None
    if any(t.data_ptr() % 16 or (t.shape[-1] * t.element_size()) % 16 for t in tensors):
        return None
    if options().grouped == "auto" and num_tokens * values.numel() < GROUPED_MIN_WORK:
        return None
    return design if _grouped_launchers() is not None else None


# Decode (at most 32 tokens: one token tile) streams the weights from DRAM, each program waiting out a
# memory round trip a step (ncu: ~2.4 us), so the programs an SM holds set the rate: a program should read
# about this many bytes of the weights. Swept on one H200 (benchmarks/decode_split.py,
# results/decode-split-NVIDIA_H200-2026-12-02-old-rule.json, bf16, M = 16, both 4096 <-> 14336 shapes):
# the fastest split read 56-64 KB a program at B = 16 and 32, ~2x that at B = 64 and ~4x at B = 128.
# Reading less pays more partials; more leaves too few programs (14336->4096, B = 16: 0.56x dense
# unsplit, 0.88x split in 4).
DECODE_BYTES_PER_PROGRAM = 56 * 1024
DECODE_MAX_TOKENS = 32
# The decode tile at B <= 32 for 16-bit inputs of at most 16 tokens: one warp a 16 x 64 tile, 6 stages.
# Forced at the default split in CUDA graphs on an H200 it beat the autotuned tile at both big shapes
# (B = 16: 0.79 -> 0.84x and 0.88 -> 0.93x dense; B = 32: 1.36 -> 1.45x and 1.50 -> 1.55x; decode_split.py
# --configs, benchmarks/NOTES.md, seventh session): a [16, B] tile gives four warps too little to do, so one
# warp a program lets more programs share an SM. The autotuner times eager launches and, given these tiles
# in its table, did not pick them (0.76x at B = 16 in that session's bench_layer run), so the rule is fixed.
DECODE_SMALL_BLOCK_TILE = {"BM": 16, "KSB": 64, "num_warps": 1, "num_stages": 6}


def decode_tile(num_tokens: int, block: int, elem_bytes: int) -> dict | None:
    """The gather forward's fixed tile where one was measured faster than the autotuned one, else None."""
    if num_tokens <= 16 and block <= 32 and elem_bytes == 2:
        return DECODE_SMALL_BLOCK_TILE
    return None


def split_slots(num_tokens: int, block_rows: int, k: int, block: int, elem_bytes: int, device: torch.device) -> int:
    """How many programs share one block-row's k slots in the gather forward: for decode inputs, as many
    as give each program DECODE_BYTES_PER_PROGRAM (x B/32 above B = 32) of the weights; for larger ones,
    enough that token tiles x block-rows x splits fill the GPU."""
    if k <= 1:
        return 1
    if num_tokens <= DECODE_MAX_TOKENS:
        per_program = DECODE_BYTES_PER_PROGRAM * max(1, block // 32)
        return max(1, min(k, round(k * block * block * elem_bytes / per_program), 16))
    sms = num_sms(device)
    num_tiles = cdiv(num_tokens, 128) * block_rows
    if num_tiles >= sms:
        return 1
    return max(1, min(k, cdiv(2 * sms, num_tiles), 16))


def split_tokens(programs: int, num_tokens: int, device: torch.device) -> int:
    """Token ranges for grad_values when its programs alone (block-rows x slot groups, or output x
    input tiles) cannot fill the GPU."""
    sms = num_sms(device)
    if programs >= sms or num_tokens < 1024:
        return 1
    return max(1, min(cdiv(2 * sms, programs), num_tokens // 512, 16))


def num_sms(device: torch.device) -> int:
    return _cuda_sms(_index(device)) if device.type == "cuda" else 4


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def cdiv(a: int, b: int) -> int:
    """Host-side ceil division (triton.cdiv is a constexpr function in recent Triton: microseconds a call)."""
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------
# The Triton launchers the ops call: the reference's signatures, the rules above applied; ``out`` is
# the tensor to write (the ops pass a view of the result they return). Tests and the GPU check pass
# ``config`` to force a variant with a fixed tile ({"tile": {...}} for the masked-dense tiles, else
# the gather kernel's tile, optionally with "SPLIT"), and ``poison=True`` to NaN-poison float32
# partial sums before the kernels write them (as they poison ``out``).


def _int32(col_indices: torch.Tensor) -> torch.Tensor:
    """int32 indices for the kernels; int64 ones clamped first, so that none wraps into [0, C)."""
    if col_indices.dtype == torch.int32:
        return col_indices
    return col_indices.clamp(-1, torch.iinfo(torch.int32).max).to(torch.int32)


def _partials(split: int, out: torch.Tensor, poison: bool) -> torch.Tensor:
    partial = torch.empty(split, *out.shape, dtype=torch.float32, device=out.device)
    return partial.fill_(float("nan")) if poison else partial


def _check(col: torch.Tensor, num_cols: int) -> None:
    if options().check_columns:
        _launchers().check_columns(col, num_cols)


def _dense_weight(run, values: torch.Tensor, col: torch.Tensor, num_cols: int) -> torch.Tensor:
    """W [R*B, C*B] for the dense-weight path, written from the blocks at their columns."""
    block_rows, _, block, _ = values.shape
    weight = torch.empty(block_rows * block, num_cols * block, dtype=values.dtype, device=values.device)
    return run.densify(values, col, num_cols, weight)


def triton_forward(x, values, col_indices, bias, *, out=None, config: dict | None = None, poison: bool = False):
    """y [M, out] = x [M, in] W^T + bias: the dense weight and cuBLAS where use_dense_weight says, the
    grouped Gluon kernel where kernel option grouped routes it,
    the masked-dense tiles (small blocks, many tokens, dense enough), the TMA forward (large blocks, many
    tokens, Hopper), else the gather kernel, its slots split over several programs (split_slots), their
    partials summed by a second launch or, with kernel option split_reduce="fused", inside the kernel."""
    run = _launchers()
    block_rows, k, block, _ = values.shape
    num_tokens, in_features = x.shape
    num_cols = in_features // block
    y = torch.empty(num_tokens, block_rows * block, dtype=x.dtype, device=x.device) if out is None else out
    col = _int32(col_indices)
    _check(col, num_cols)
    tile = config.get("tile") if config is not None else None
    if config is None and use_dense_weight(block, k / num_cols, num_tokens):
        forward_dense(x, _dense_weight(run, values, col, num_cols), bias, y)
    elif config is None and (grouped := use_grouped((x, values, y), num_tokens)) is not None:
        launch = _grouped_launchers()
        g, grouped_config = grouped
        launch.forward(x, values, launch.forward_entries[g](col, num_cols), bias, y, grouped_config)
    elif tile is not None or (config is None and use_tiles(block, k / num_cols, num_tokens)):
        run.tile_matmul(x, values, run.slot_table(col, num_cols), bias, y, False, tile)
    elif config is None and use_tma(x, values, num_tokens):
        run.forward_tma(x, values, col, bias, y, persistent=options().tma == "persistent", ws=options().tma == "ws")
    else:
        split = (config or {}).get("SPLIT") or split_slots(num_tokens, block_rows, k, block, x.element_size(), x.device)
        gather = None if config is None else {key: v for key, v in config.items() if key != "SPLIT"}
        if config is None:
            gather = decode_tile(num_tokens, block, x.element_size())
        if split == 1:
            run.forward_gather(x, values, col, bias, y, gather)
        elif options().split_reduce == "fused":
            counters = run.split_counters(y, cdiv(num_tokens, 16) * block_rows)
            run.forward_gather(x, values, col, bias, _partials(split, y, poison), gather, fused_out=y, counters=counters)
        else:
            partial = _partials(split, y, poison)
            run.forward_gather(x, values, col, None, partial, gather)
            run.reduce_partials(partial, bias, y)
    return y


def triton_grad_input(grad_out, values, col_indices, in_features: int, *, out=None, config=None):
    """grad_x [M, in] = grad_out [M, out] W: the dense weight and cuBLAS where use_dense_weight says, the
    grouped Gluon kernel where kernel option grouped routes it,
    the masked-dense tiles on W (as for the forward), else the column walk over the column view of the
    topology (through tensor descriptors where use_tma says)."""
    run = _launchers()
    _, k, block, _ = values.shape
    num_tokens = grad_out.shape[0]
    num_cols = in_features // block
    grad_x = torch.empty(num_tokens, in_features, dtype=grad_out.dtype, device=grad_out.device) if out is None else out
    col = _int32(col_indices)
    tile = config.get("tile") if config is not None else None
    if config is None and use_dense_weight(block, k / num_cols, num_tokens, "backward"):
        grad_input_dense(grad_out, _dense_weight(run, values, col, num_cols), grad_x)
    elif config is None and (grouped := use_grouped((grad_out, values, grad_x), num_tokens)) is not None:
        launch = _grouped_launchers()
        g, grouped_config = grouped
        launch.grad_input(grad_out, values, launch.grad_input_entries[g](col, num_cols), grad_x, grouped_config)
    elif tile is not None or (config is None and use_tiles(block, k / num_cols, num_tokens, "backward")):
        run.tile_matmul(grad_out, values, run.slot_table(col, num_cols), None, grad_x, True, tile)
    else:
        slots_by_col, col_start = run.column_view(col, num_cols)
        if config is None and use_tma(grad_out, values, num_tokens, "grad_input"):
            run.grad_input_tma(grad_out, values, slots_by_col, col_start, grad_x, None, ws=options().tma == "ws")
        else:
            run.grad_input_columns(grad_out, values, slots_by_col, col_start, grad_x, config)
    return grad_x


def triton_grad_values(grad_out, x, col_indices, block_size: int, *, out=None, config=None, poison: bool = False):
    """dL/dvalues [R, K, B, B]: the blocks of the dense gradient where use_dense_weight says, the tile kernel
    where the backward takes tiles, else the gather kernel (the
    TMA kernel where use_tma says and no split is needed); the tokens split into fixed ranges where the
    programs alone cannot fill the GPU. The tile kernel
    writes only the slots in the slot table, so the column check runs there too."""
    run = _launchers()
    num_tokens, in_features = x.shape
    out_features = grad_out.shape[1]
    block_rows, k = col_indices.shape
    block = block_size
    num_cols = in_features // block
    dv = torch.empty(block_rows, k, block, block, dtype=grad_out.dtype, device=grad_out.device) if out is None else out
    tile = config.get("tile") if config is not None else None
    if config is None and use_dense_weight(block, k / num_cols, num_tokens, "backward"):
        return grad_values_dense(grad_out, x, _int32(col_indices), dv, run.blocks_of)
    tiled = tile is not None or (config is None and use_tiles(block, k / num_cols, num_tokens, "backward"))
    if config is not None and "SPLIT" in config:
        split = config["SPLIT"]
    elif tiled:
        split = split_tokens(cdiv(out_features, 128) * cdiv(in_features, 128), num_tokens, x.device)
    else:
        split = split_tokens(block_rows * cdiv(k, max(1, 128 // block)), num_tokens, x.device)
    target = dv if split == 1 else _partials(split, dv, poison)
    col = _int32(col_indices)
    if tiled:
        _check(col, num_cols)
        run.grad_values_tiles(grad_out, x, run.slot_table(col, num_cols), target, tile)
    else:
        gather = None if config is None else {key: v for key, v in config.items() if key != "SPLIT"}
        if split == 1 and config is None and use_tma(grad_out, x, num_tokens, "grad_values", block):
            run.grad_values_tma(grad_out, x, col, block, out=dv, ws=options().tma == "ws")
        else:
            run.grad_values_gather(grad_out, x, col, target, gather)
    if split > 1:
        run.reduce_partials(target, None, dv)
    return dv
