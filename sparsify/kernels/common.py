"""What the Triton kernels share: the shared-memory budget and the autotune pruners built on it, the
float32-accumulating dot, the grouped program order, token ranges of split reductions, the fixed-order
reduction of float32 partials (a second launch, or fused into the split kernel), and host-side shape helpers."""

from __future__ import annotations

import inspect

import torch
import triton
import triton.language as tl
import triton.testing

from sparsify.kernels.dispatch import cdiv, interpreting  # noqa: F401  (cdiv: the kernel files' import)
from sparsify.kernels.launch import launch

GROUP_M = tl.constexpr(8)  # token tiles per group of the grouped program order

# Shared memory one program may use: Hopper (H100 / H200) allows 227 KB a block; 27 KB stay free for
# what Triton allocates beside the pipeline buffers (layout conversions, barriers, the epilogue), which
# the estimates below do not count. The one budget every pruner and the untimed-config rule use.
SMEM_BUDGET = 200 * 1024


def _quick_bench(fn, quantiles=None):
    """Autotuning timer: short runs keep first-call tuning brief (medians of ~20 ms)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# passed to every @triton.autotune here, where this Triton accepts it
AUTOTUNE_TIMER = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


# Below this many multiply-adds a problem takes the first fitting config instead of timing them all:
# each config costs seconds of compilation on first call, more than a small layer ever gains back
# (measured: a 4-layer quick-start Llama spent 123 s tuning on an H100 before this rule).
AUTOTUNE_MIN_MACS = 1 << 31


def tune_one_config(args: dict) -> bool:
    """True where autotuning should keep a single config: under the interpreter, or for small problems."""
    if interpreting():
        return True
    out_features = args.get("N_OUT", args.get("N", 0))
    return args["M_BUCKET"] * out_features * args["K"] * args["B"] < AUTOTUNE_MIN_MACS


def tuning_candidates(kept: list, args: dict, stage_bytes) -> list:
    """What an autotune pruner returns: every kept config where they are timed (the autotuner skips any
    that runs out of shared memory), else (``tune_one_config``) the one config launched untimed, which
    must fit, since nothing catches an out-of-resources error at launch: the first whose every pipeline
    stage fits in SMEM_BUDGET, trying fewer stages before giving up, else the smallest.
    ``stage_bytes(config)``: shared memory of one pipeline stage."""
    if not tune_one_config(args):
        return kept
    candidates = kept + [
        triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages, pre_hook=c.pre_hook)
        for stages in (2, 1) for c in kept if c.num_stages > stages
    ]

    def footprint(config) -> int:
        return stage_bytes(config) * max(1, config.num_stages)

    safe = [c for c in candidates if footprint(c) <= SMEM_BUDGET]
    return [safe[0] if safe else min(candidates, key=footprint)]


def element_bytes(args: dict) -> int:
    """The element size of the first tensor among a kernel's arguments (its operands share a dtype)."""
    return next(v.element_size() for v in args.values() if hasattr(v, "element_size"))


def gather_configs(table: list, width_key: str) -> list:
    """Autotune configs of a gather kernel from its table of (BM, width, num_warps, num_stages)."""
    return [triton.Config({"BM": bm, width_key: w}, num_warps=nw, num_stages=ns) for bm, w, nw, ns in table]


def gather_fits(bm: int, width: int, block: int, bucket: int, stage_bytes: int, stages: int) -> bool:
    """Whether a gather kernel's config suits the block size and token count, and (as a first cut for
    the autotuner, which skips configs that turn out not to fit) its pipeline fits in SMEM_BUDGET.
    ``width``: reduction positions a step (whole blocks, >= 64-wide parts of one, at most 8 blocks)."""
    if width > 8 * block or (width < block and (width < 64 or block % width)):
        return False
    if (bucket <= 32) != (bm <= 32):  # decode tiles for decode inputs, prefill tiles otherwise
        return False
    # Triton 3.6 / 3.9 keep stages - 2 data buffers in these loops (the index load takes a stage). Not
    # exact for every kernel (an H100 launch of grad_values (64, 256, 8, 3) in float32 asked for 240 KB);
    # tuning_candidates counts every stage where nothing is timed.
    return stage_bytes * max(1, stages - 2) <= SMEM_BUDGET


def prune_gather(width_key: str, stage_bytes_of):
    """An autotune pruner for a gather kernel with configs {"BM", width_key}: keeps those that
    ``gather_fits``, else one that is valid for the block size. ``stage_bytes_of(config, block, elem)``."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block, bucket, elem = args["B"], args["M_BUCKET"], args["ELEM_BYTES"]
        kept = [
            c for c in configs
            if gather_fits(c.kwargs["BM"], c.kwargs[width_key], block, bucket, stage_bytes_of(c, block, elem), c.num_stages)
        ]
        if not kept:
            kept = [triton.Config({"BM": 16 if bucket <= 32 else 64, width_key: block}, num_warps=4, num_stages=2)]
        return tuning_candidates(kept, args, lambda c: stage_bytes_of(c, block, elem))

    return prune


def prune_descriptors(stage_bytes_of, buffers_of, fallback):
    """An autotune pruner for a tensor-descriptor kernel with configs {"KC", ...}: keeps those whose KC
    divides B and whose ``buffers_of(config)`` pipeline buffers of ``stage_bytes_of(config, block, elem)``
    fit in SMEM_BUDGET, else ``fallback``. (A loop that loads an index keeps num_stages - 2 buffers, one
    that loads none keeps num_stages: benchmarks/compile_report.py.)"""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        block, elem = args["B"], args["ELEM_BYTES"]
        # warp-specialized loops (WS) for 16-bit operands only: for float32 (tf32) ones Triton 3.6 fails to
        # compile them for sm_90 (PassManager error, which the autotuner does not catch) or they overflow
        # shared memory (the forward's: 262-328 KB at B = 128)
        kept = [c for c in configs if block % c.kwargs["KC"] == 0 and not (c.kwargs.get("WS") and elem != 2)
                and stage_bytes_of(c, block, elem) * buffers_of(c) <= SMEM_BUDGET]
        return tuning_candidates(kept or [fallback], args, lambda c: stage_bytes_of(c, block, elem))

    return prune


def prune_tiles(rows_key: str, depth_key: str, cols_key: str, *multiple_of_block: str):
    """An autotune pruner for a masked-dense tile kernel whose stage holds an [rows, depth] and a
    [depth, cols] operand tile: keeps the configs whose sizes under ``multiple_of_block`` are multiples of B."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        kept = [c for c in configs if all(c.kwargs[key] % args["B"] == 0 for key in multiple_of_block)]
        elem = element_bytes(args)
        return tuning_candidates(
            kept, args, lambda c: (c.kwargs[rows_key] + c.kwargs[cols_key]) * c.kwargs[depth_key] * elem
        )

    return prune


@triton.jit
def grouped_tile(pid, num_m, num_n):
    """(token tile, output-column tile) of program ``pid`` in grouped order: GROUP_M token tiles visit
    every column tile before the next group starts, so a panel of activations stays in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def token_range(pid_s, M, BT: tl.constexpr, SPLIT):
    """Tokens [lo, hi) of split ``pid_s`` when M tokens are cut into SPLIT ranges of whole BT-token tiles."""
    per_split = tl.cdiv(tl.cdiv(M, BT), SPLIT) * BT
    lo = pid_s * per_split
    return lo, tl.minimum(lo + per_split, M)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST is set only under the CPU interpreter, whose
    dot multiplies bfloat16 storage as integers (Triton 3.9): there the operands go to float32 first,
    which gives the same products (bf16 x bf16 is exact in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


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


@triton.jit
def sum_split_if_last(p_ptr, count_ptr, bias_ptr, y_ptr, rows, row_ok, cols, M, N, SPLIT,
                      HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """The second half of a split reduction inside the split kernel, called by each of the SPLIT programs of
    an output tile after storing its float32 partial tile p[s, rows, cols] of p [SPLIT, M, N]: the last of
    them to arrive (``count_ptr``: the tile's counter, zero before the call) sums the SPLIT partials in the
    order s = 0, 1, ... as reduce_partials does (the same bits), adds the bias, writes y [M, N] and sets the
    counter back to zero for the next call."""
    tl.debug_barrier()  # every thread's part of the partial is stored before this program's arrival counts
    arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
    if arrived == SPLIT - 1:
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for s in range(SPLIT):  # through L2 (.cg): the other programs' partials, never a stale L1 line
            acc += tl.load(p_ptr + (s * M).to(tl.int64) * N + offs, mask=row_ok[:, None], other=0.0,
                           cache_modifier=".cg")
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols).to(tl.float32)[None, :]
        tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None])
        tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")


REDUCE_BLOCK = 1024


def reduce_partials(partial: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> None:
    """out = partial.sum(0) (+ bias along out's last dimension), summed in a fixed order: the second
    half of every split reduction (split slots of the forward, split tokens of grad_values).
    partial: float32 [SPLIT, *out.shape]."""
    split = partial.shape[0]
    width = out.shape[-1] if bias is not None else out.numel()
    count = out.numel() // width
    launch(_reduce_partials_kernel, (cdiv(out.numel(), REDUCE_BLOCK),),
           (partial, bias if bias is not None else out, out, count, width, split),
           dict(HAS_BIAS=bias is not None, BLOCK=REDUCE_BLOCK), out.device)


def interpreter_upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tf32 for float32 operands only where torch allows it for matmuls (like nn.Linear); else exact."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def m_bucket(m: int) -> int:
    """Autotuning key for the token count: powers of two, capped."""
    return min(1 << max(m - 1, 0).bit_length(), 16384)
