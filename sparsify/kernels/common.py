"""What the Triton kernels share: autotuning rules, the float32-accumulating dot, host-side shape helpers."""

from __future__ import annotations

import functools
import inspect
import os

import torch
import triton
import triton.language as tl
import triton.testing

GROUP_M = tl.constexpr(8)  # token tiles per group of the grouped program order


def _quick_bench(fn, quantiles=None):
    """Autotuning timer: short runs keep first-call tuning brief (medians of ~20 ms)."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


# passed to every @triton.autotune here, where this Triton accepts it
AUTOTUNE_TIMER = {"do_bench": _quick_bench} if "do_bench" in inspect.signature(triton.autotune).parameters else {}


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Below this many multiply-adds a problem takes the first fitting config instead of timing them all:
# each config costs seconds of compilation on first call, more than a small layer ever gains back
# (measured: a 4-layer quick-start Llama spent 123 s tuning on an H100 before this rule).
AUTOTUNE_MIN_MACS = 1 << 31


# Shared memory a program may use on Hopper is 227 KB; keep room for Triton's own scratch (layout changes).
SAFE_SMEM_BYTES = 200 * 1024


def tuning_candidates(kept: list, args: dict, stage_bytes) -> list:
    """What an autotune pruner returns: every kept config where they are timed (the autotuner skips any
    that runs out of shared memory), else (``tune_one_config``) the one config launched untimed, which
    must fit, since nothing catches an out-of-resources error at launch: the first whose every pipeline
    stage fits in SAFE_SMEM_BYTES, trying fewer stages before giving up, else the smallest.
    ``stage_bytes(config)``: shared memory of one pipeline stage."""
    if not tune_one_config(args):
        return kept
    candidates = kept + [
        triton.Config(dict(c.kwargs), num_warps=c.num_warps, num_stages=stages, pre_hook=c.pre_hook)
        for stages in (2, 1) for c in kept if c.num_stages > stages
    ]

    def footprint(config) -> int:
        return stage_bytes(config) * max(1, config.num_stages)

    safe = [c for c in candidates if footprint(c) <= SAFE_SMEM_BYTES]
    return [safe[0] if safe else min(candidates, key=footprint)]


def element_bytes(args: dict) -> int:
    """The element size of the first tensor among a kernel's arguments (its operands share a dtype)."""
    return next(v.element_size() for v in args.values() if hasattr(v, "element_size"))


def tune_one_config(args: dict) -> bool:
    """True where autotuning should keep a single config: under the interpreter, or for small problems."""
    if interpreting():
        return True
    out_features = args.get("N_OUT", args.get("N", 0))
    return args["M_BUCKET"] * out_features * args["K"] * args["B"] < AUTOTUNE_MIN_MACS

@triton.jit
def grouped_tile(pid, num_m, num_n):
    """(token tile, output-column tile) of program ``pid`` in grouped order: GROUP_M token tiles visit
    every column tile before the next group starts, so a panel of activations stays in L2."""
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b with float32 accumulation. UPCAST is set only under the CPU interpreter, whose
    dot multiplies bfloat16 storage as integers (Triton 3.9): there the operands go to float32 first,
    which gives the same products (bf16 x bf16 is exact in float32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=PRECISION)


def interpreter_upcast(dtype: torch.dtype) -> bool:
    return interpreting() and dtype == torch.bfloat16

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

